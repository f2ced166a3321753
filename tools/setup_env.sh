#!/usr/bin/env bash
# Creates ./.venv with everything the project needs (idempotent). Sourced by run_main.sh / run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The CPU build of torch first (any other torch request pulls a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,torch${UNIMAGE_EXTRAS:+,$UNIMAGE_EXTRAS}]"
