"""Builds a dataset into --data_dir as TFDS ArrayRecord (no TensorFlow needed).

  python tools/build_data.py --dataset=storyworld --data_dir=artifacts/data --num_stories=1000
  python tools/build_data.py --dataset=storyboards --jsonl=my/scripts.jsonl --image_dir=my/images \\
      --data_dir=artifacts/data --skip_bad_records
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from data_pipelines import builders  # noqa: E402
from data_pipelines.builders.user_import import BadRecordError  # noqa: E402
from unimage_jax import cli  # noqa: E402
from unimage_jax.errors import UserError  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "storyworld", ["storyworld", "storyboards"], "What to build.")
_DATA_DIR = flags.DEFINE_string("data_dir", "artifacts/data", "TFDS data directory.")
_NUM_STORIES = flags.DEFINE_integer("num_stories", 1000, "StoryWorld: train stories.")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", None, "StoryWorld: validation stories (default n/20).")
_SEED = flags.DEFINE_integer("seed", 0, "StoryWorld: generator seed.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Keyframe side in pixels.")
_JSONL = flags.DEFINE_string("jsonl", None, "Storyboards: JSONL file of scripts.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Storyboards: folder the keyframe paths are relative to.")
_CONFIG_NAME = flags.DEFINE_string("config_name", "default", "Storyboards: name of this import.")
_SKIP = flags.DEFINE_bool("skip_bad_records", False, "Storyboards: skip and count bad records instead of failing.")


def main(argv):
  del argv
  t0 = time.time()
  if _DATASET.value == "storyworld":
    b = builders.build_storyworld(_DATA_DIR.value, _NUM_STORIES.value, _IMAGE_SIZE.value, _SEED.value,
                                  _NUM_VALIDATION.value)
    counts = {s: b.info.splits[s].num_examples for s in b.info.splits}
    print(f"storyworld: {counts} stories in {b.data_dir} ({time.time() - t0:.1f}s)")
    return
  if not _JSONL.value or not _IMAGE_DIR.value:
    raise UserError("--dataset=storyboards needs --jsonl and --image_dir")
  try:  # a failed import leaves the previous build of this --config_name as it was
    b = builders.build_storyboards(_DATA_DIR.value, _JSONL.value, _IMAGE_DIR.value, _IMAGE_SIZE.value,
                                   _SKIP.value, _CONFIG_NAME.value)
  except BadRecordError as e:
    raise UserError(f"{e} (pass --skip_bad_records to skip and count bad records)") from None
  r = b.report
  print(f"storyboards: imported {r.imported}, skipped {r.num_skipped} bad records "
        f"{dict(sorted(r.skipped.items()))} into {b.data_dir} ({time.time() - t0:.1f}s)")
  for m in r.messages:
    print(f"  skipped: {m}")


if __name__ == "__main__":
  cli.run(main)
