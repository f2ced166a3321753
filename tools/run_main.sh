#!/usr/bin/env bash
# Fresh machine -> set-up -> the main job: train the tiny model on the bundled StoryWorld data
# (built on first use), then direct a storyboard with it.
# Extra arguments go to tools/train.py (e.g. --config.train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
WORKDIR=${WORKDIR:-runs/tiny}
python tools/train.py --config=configs/tiny.py --workdir="$WORKDIR" "$@"
python tools/direct.py --checkpoint="$WORKDIR" --output="$WORKDIR/storyboard" \
  --prompt="${PROMPT:-Mila and Odo spend a day at the park.}"
echo "open $WORKDIR/storyboard/storyboard.html"
