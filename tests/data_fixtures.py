"""Shared small builds for the data tests (built once per test session in a temp dir)."""

import functools
import tempfile

from configs import tiny
from data_pipelines import pipeline


@functools.lru_cache(maxsize=None)
def built_dir(num_stories: int = 120) -> str:
  root = tempfile.mkdtemp(prefix="unimage_data_test_")
  c = tiny_config(root, num_stories)
  pipeline.ensure_dataset(c, verbose=False)
  return root


def tiny_config(root: str | None = None, num_stories: int = 120, **data):
  """The tiny config pointed at a small StoryWorld build (built on first use)."""
  root = built_dir(num_stories) if root is None else root
  c = tiny.get_config()
  c.data.data_dir = f"{root}/data"
  c.data.tokenizer_path = f"{root}/tokenizer/spm.model"
  c.data.num_stories = num_stories
  # the tests' rows: the earlier, smaller tiny rows (each test overrides what it needs)
  c.data.update(batch_size=4, und_len=512, gen_len=256, max_segments=64, noised_copies=1)
  c.optim.ema_decay = 0.0
  for k, v in data.items():
    if k == "tasks":
      c.data.tasks.update(v)
    else:
      setattr(c.data, k, v)
  return c
