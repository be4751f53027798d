#!/bin/bash
# The tests, exactly as CI runs them (.ci/run): set up (scripts/setup.sh, with the dev extras), lint, then the
# whole suite on the CPU (no network; multi-process tests use 2 gloo ranks). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev NEED="pytest, ruff" source scripts/setup.sh
ruff check .
python -m pytest -q -x "$@"
