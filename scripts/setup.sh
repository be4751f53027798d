#!/bin/bash
# Sourced by configs/demo.sh and scripts/test.sh: make sure `python` can run minillava, else set up a virtual
# environment for it. VENV (default .venv) is created if missing and activated; torch==2.13.0 (pip's CPU wheel)
# is installed only if that environment has no torch, so a CUDA build installed there first is kept (README,
# "GPU machines"); then minillava itself, editable, with EXTRAS (e.g. dev). NEED: more modules the caller imports.
VENV=${VENV:-.venv}
# installed (its dependencies with it), not merely importable from this folder
if ! python -c "import importlib.metadata as m; m.version('minillava'); import torch${NEED:+, $NEED}" 2>/dev/null; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    source "$VENV/bin/activate"
    python -m pip install -q --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
fi
