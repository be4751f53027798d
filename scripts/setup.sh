#!/bin/bash
# Sourced by configs/demo.sh and scripts/test.sh: make sure `python` can run minillava, else set up a virtual
# environment for it. VENV (default .venv) is created if missing and activated; torch==2.13.0 (pip's CPU wheel)
# is installed only if that environment has no torch, so a CUDA build installed there first is kept (README,
# "GPU machines"); then minillava itself, editable, with EXTRAS (e.g. dev). NEED: more modules the caller imports.
# TORCH / TRANSFORMERS (.ci/run's version legs): exactly these releases (torch's default build for any but 2.13.0:
# CUDA libraries, run on the CPU), in VENV; an environment with other releases is not taken as set up.
VENV=${VENV:-.venv}
# installed (its dependencies with it), not merely importable from this folder
ready="import importlib.metadata as m; m.version('minillava'); import torch${NEED:+, $NEED}"
[ -z "${TORCH:-}" ] || ready+="; assert torch.__version__.split('+')[0] == '$TORCH'"
[ -z "${TRANSFORMERS:-}" ] || ready+="; import transformers; assert transformers.__version__ == '$TRANSFORMERS'"
if ! python -c "$ready" 2>/dev/null; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    source "$VENV/bin/activate"
    python -m pip install -q --upgrade pip
    if [ -n "${TORCH:-}" ] || ! python -c "import torch" 2>/dev/null; then
        python -m pip install -q "torch==${TORCH:-2.13.0}"
    fi
    [ -z "${TRANSFORMERS:-}" ] || python -m pip install -q "transformers==$TRANSFORMERS"
    python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
fi
