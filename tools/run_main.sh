#!/usr/bin/env bash
# Fresh machine -> set-up -> train the tiny default model (the README's main job).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
python tools/train.py --config=configs/tiny.py --workdir=runs/tiny "$@"
