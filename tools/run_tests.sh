#!/usr/bin/env bash
# Fresh machine -> set-up -> the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
export JAX_PLATFORMS=cpu
python -m pytest -q -p no:cacheprovider --timeout=1200 tests "$@"
