#!/usr/bin/env bash
# Fresh machine -> set-up -> the main job: train the tiny model on the bundled StoryWorld data
# (built on first use), then direct a storyboard with it.
# Extra arguments go to tools/train.py (e.g. --config.train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
WORKDIR=${WORKDIR:-runs/tiny}
# one CPU device per core of the 2-core target: the batch's 2 rows train data parallel, one per
# core (XLA:CPU runs most of a step's fusions on one thread; BENCHMARKS.md, "data parallel")
python tools/train.py --config=configs/tiny.py --workdir="$WORKDIR" --cpu_devices_per_process="${CPU_DEVICES:-2}" "$@"
# the prompt of a held-out StoryWorld story (never trained on), so the storyboard can be scored
if [ -n "${PROMPT:-}" ]; then WHAT=(--prompt="$PROMPT"); else WHAT=(--heldout_story="${STORY:-0}"); fi
python tools/direct.py --checkpoint="$WORKDIR" --output="$WORKDIR/storyboard" "${WHAT[@]}"
echo "open $WORKDIR/storyboard/storyboard.html (contact sheet: $WORKDIR/storyboard/contact_sheet.png)"
