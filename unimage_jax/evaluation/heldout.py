"""The held-out StoryWorld prompts every evaluation tool scores (tools/evaluate.py, diagnose_flow.py)."""

from __future__ import annotations

import os

from unimage_jax.errors import UserError


class EvalError(UserError, ValueError):
  """A bad input to the evaluator (checkpoint, prompt set); the message says what and where."""


def check_prompts(prompts: list[str], where: str) -> list[str]:
  if not prompts:
    raise EvalError(f"the prompt set {where} is empty")
  for i, p in enumerate(prompts, start=1):
    if not isinstance(p, str) or not p.strip():
      raise EvalError(f"prompt {i} of {where} is empty")
  return prompts


def validation_records(config, n: int) -> list[dict]:
  """The first n validation stories of the build ``ensure_dataset`` makes for ``config``.

  Beyond the stored split, stories continue the same held-out stream: the builder's own
  generator (``StoryWorld._generate_examples("validation", ...)``) at the next indices.
  """
  from data_pipelines import builders, pipeline
  from data_pipelines.builders.storyworld import StoryWorld, make_config
  d = config.data
  if n < 1:
    raise EvalError(f"--num_prompts must be >= 1, got {n}")
  # StoryWorld: the build ensure_dataset makes for this config (its size), built here if missing
  name = d.dataset_config or (pipeline.default_build_name(config) if d.dataset == "storyworld" else "")
  if d.dataset == "storyworld" and name not in builders.built_configs(d.data_dir, d.dataset):
    print(f"building StoryWorld ({d.num_stories} stories, {d.image_size}px) into {d.data_dir}")
    builders.build_storyworld(d.data_dir, d.num_stories, d.image_size, seed=0)
  try:
    source = builders.load_source(d.data_dir, d.dataset, "validation", name)
  except builders.DatasetNotBuiltError:
    raise EvalError(f"dataset {d.dataset!r} is not built under {d.data_dir}") from None
  except Exception as e:  # noqa: BLE001 - any failure to open the split is a prompt-set error
    raise EvalError(f"cannot load the validation split of {d.dataset!r} under {d.data_dir}: {e}") from None
  # the stored order is not the story order: sort by story id (validation_0000007) and take the first n
  records = sorted((builders.decode_record(source[i]) for i in range(len(source))), key=lambda r: r["story_id"])[:n]
  if n > len(records):
    if d.dataset != "storyworld":
      raise EvalError(f"the validation split holds {len(records)} stories, fewer than --num_prompts={n}")
    print(f"validation split holds {len(records)} stories; continuing its held-out stream in memory "
          f"for {n - len(records)} more")
    size = records[0]["keyframes"][0].shape[0] if records else d.image_size
    have = {r["story_id"] for r in records}
    b = StoryWorld(data_dir=os.path.join(d.data_dir, ".eval_unused"), config=make_config(d.num_stories, size, 0, n))
    for key, ex in b._generate_examples("validation", n):
      if key not in have:
        records.append(builders.decode_record(ex))
  for r in records:
    check_prompts([r["script"].prompt], f"validation story {r['story_id']}")
  return records
