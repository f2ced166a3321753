"""Scores directors on held-out StoryWorld prompts (README "Evaluation").

  python tools/evaluate.py --ground_truth --num_prompts=100            # upper bound row
  python tools/evaluate.py --checkpoint=runs/stage1 --label=stage-1 \
      --checkpoint=runs/stage2 --label=stage-1+2 --num_prompts=50 --output=artifacts/eval

Prompts come from the StoryWorld validation split that ``ensure_dataset`` builds for --config
(only the prompts are given to the director). Writes <output>/<label>.jsonl (one line per story),
<output>/averages.json and <output>/comparison.md.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unimage_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config naming the StoryWorld data.")
_CHECKPOINT = flags.DEFINE_multi_string("checkpoint", [], "A training workdir to evaluate (repeatable).")
_LABEL = flags.DEFINE_multi_string("label", [], "Row label per --checkpoint (default: the workdir name).")
_GROUND_TRUTH = flags.DEFINE_bool("ground_truth", False, "Also score the validation records themselves.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 20, "Held-out prompts to evaluate.")
_SHOTS = flags.DEFINE_integer("shots", None, "Shots per story asked of the director (default: its choice).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed of story i is seed + i.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Use EMA weights when the checkpoint has them.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line, instead of "
                                    "the validation split (checkpoints only: there is no ground truth).")
_OUTPUT = flags.DEFINE_string("output", "artifacts/eval", "Output directory.")

GT_LABEL = "ground truth (upper bound)"


class EvalError(UserError, ValueError):
  """A bad input to the evaluator (checkpoint, prompt set); the message says what and where."""


# ------------------------------------------------------------------------------ inputs
def check_checkpoint(workdir: str) -> None:
  """Fails clearly unless ``workdir`` holds at least one Orbax step directory."""
  from unimage_jax.interchange import orbax_io
  if not os.path.isdir(workdir):
    raise EvalError(f"checkpoint directory {workdir!r} does not exist")
  if orbax_io.finished_steps(orbax_io.checkpoint_dir(workdir)):
    return
  raise EvalError(f"{workdir!r} holds no checkpoints (expected step directories under "
                  f"{os.path.join(workdir, 'checkpoints')}, as tools/train.py writes them)")


def check_prompts(prompts: list[str], where: str) -> list[str]:
  if not prompts:
    raise EvalError(f"the prompt set {where} is empty")
  for i, p in enumerate(prompts, start=1):
    if not isinstance(p, str) or not p.strip():
      raise EvalError(f"prompt {i} of {where} is empty")
  return prompts


def read_prompts_file(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise EvalError(f"prompts file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    lines = f.read().rstrip("\n").split("\n")
  return check_prompts(lines, path)


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


# ------------------------------------------------------------------------------ scoring
def score_checkpoint(workdir: str, prompts: list[tuple[str, str]], shots: int | None, seed: int,
                     step: int | None, use_ema: bool) -> list[dict]:
  from unimage_jax.evaluation import metrics
  try:
    from unimage_jax.director import Director
  except ImportError as e:
    raise EvalError(f"unimage_jax.director is not available in this checkout ({e})") from None
  try:
    director = Director.from_checkpoint(workdir, step=step, use_ema=use_ema)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise EvalError(f"cannot load a director from {workdir!r}: {type(e).__name__}: {e}") from None
  out = []
  for i, (story_id, prompt) in enumerate(prompts):
    sb = director.direct(prompt, shots=shots, seed=seed + i)
    out.append(metrics.score_story(metrics.from_storyboard(story_id, sb)))
  return out


# ------------------------------------------------------------------------------ outputs
def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def comparison_table(rows: dict[str, dict]) -> str:
  lines = ["| label | stories | shots | validity | repaired | interpretable | cast consistency | agreement | "
           "identity consistency | place accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for label, a in rows.items():
    lines.append(f"| {label} | {a['stories']} | {a['shots']} | {_fmt(a['validity'])} | {a['repaired']} | "
                 f"{a['interpretable']} | "
                 f"{_fmt(a['cast_consistency'])} | {_fmt(a['agreement'])} | "
                 f"{_fmt(a['identity_consistency'])} | {_fmt(a['place_accuracy'])} |")
  return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "run"


def write_outputs(output: str, results: dict[str, list[dict]]) -> dict[str, dict]:
  from unimage_jax.evaluation import metrics
  os.makedirs(output, exist_ok=True)
  averages = {label: metrics.average(rs) for label, rs in results.items()}
  for label, rs in results.items():
    with open(os.path.join(output, _slug(label) + ".jsonl"), "w") as f:
      for r in rs:
        f.write(json.dumps(r) + "\n")
  with open(os.path.join(output, "averages.json"), "w") as f:
    json.dump(averages, f, indent=2)
  with open(os.path.join(output, "comparison.md"), "w") as f:
    f.write(comparison_table(averages))
  return averages


def run(config, checkpoints: list[str], labels: list[str], ground_truth: bool, num_prompts: int,
        shots: int | None, seed: int, output: str, step: int | None = None, use_ema: bool = True,
        prompts_file: str | None = None) -> dict[str, dict]:
  """The whole evaluation; returns the averages per row label."""
  if not checkpoints and not ground_truth:
    raise EvalError("nothing to evaluate: pass --checkpoint=<workdir> and/or --ground_truth")
  if shots is not None and shots < 1:
    raise EvalError(f"--shots must be >= 1, got {shots}")
  if labels and len(labels) != len(checkpoints):
    raise EvalError(f"{len(labels)} --label for {len(checkpoints)} --checkpoint")
  for c in checkpoints:
    check_checkpoint(c)
  labels = labels or [os.path.basename(os.path.normpath(c)) for c in checkpoints]
  if len(set(labels)) != len(labels):
    raise EvalError(f"row labels must differ, got {labels}")
  if prompts_file:
    if ground_truth:
      raise EvalError("--ground_truth needs the validation split, not --prompts_file")
    prompts = [(f"prompt{i:04d}", p) for i, p in enumerate(read_prompts_file(prompts_file)[:num_prompts])]
    records = []
  else:
    records = validation_records(config, num_prompts)
    prompts = [(r["story_id"], r["script"].prompt) for r in records]
  results: dict[str, list[dict]] = {}
  if ground_truth:
    from unimage_jax.evaluation import metrics
    results[GT_LABEL] = metrics.score_ground_truth(records)
  for c, label in zip(checkpoints, labels):
    results[label] = score_checkpoint(c, prompts, shots, seed, step, use_ema)
  return write_outputs(output, results)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    averages = run(_CONFIG.value, _CHECKPOINT.value, _LABEL.value, _GROUND_TRUTH.value, _NUM_PROMPTS.value,
                   _SHOTS.value, _SEED.value, _OUTPUT.value, _STEP.value, _USE_EMA.value, _PROMPTS_FILE.value)
  except EvalError as e:
    print(f"evaluate.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(comparison_table(averages))
  print(f"wrote {_OUTPUT.value}/comparison.md, averages.json and one JSONL per row")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors (a DirectorError while directing, ...) as one line, exit 2
