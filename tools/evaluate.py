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
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


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
_SET = flags.DEFINE_multi_string("set", [], "Override an inference setting of every checkpoint's director, "
                                 "as tools/direct.py --set (e.g. --set=temperature=0.3).")
_TRUE_SCRIPTS = flags.DEFINE_bool("true_scripts", False, "Also a row per checkpoint whose keyframes are drawn "
                                  "for the held-out stories' own scripts (the image side alone).")

GT_LABEL = "ground truth (upper bound)"

from unimage_jax.evaluation.heldout import EvalError, check_prompts, validation_records  # noqa: E402


# ------------------------------------------------------------------------------ inputs
def check_checkpoint(workdir: str) -> None:
  """Fails clearly unless ``workdir`` holds at least one Orbax step directory."""
  from unimage_jax.interchange import orbax_io
  if not os.path.isdir(workdir):
    raise EvalError(f"checkpoint directory {workdir!r} does not exist")
  if orbax_io.run_steps(workdir):
    return
  raise EvalError(f"{workdir!r} holds no checkpoints (expected step directories under "
                  f"{os.path.join(workdir, orbax_io.CHECKPOINTS)}, as tools/train.py writes them)")


def read_prompts_file(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise EvalError(f"prompts file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    lines = f.read().rstrip("\n").split("\n")
  return check_prompts(lines, path)


# ------------------------------------------------------------------------------ scoring
def score_checkpoint(workdir: str, prompts: list[tuple[str, str]], shots: int | None, seed: int,
                     step: int | None, use_ema: bool, true_scripts: list | None = None,
                     overrides: Sequence[str] = ()) -> list[dict]:
  """Directs every prompt and scores the storyboard; with ``true_scripts`` (records) it instead
  draws the keyframes of each record's own script (teacher forcing the text)."""
  from unimage_jax.evaluation import metrics
  try:
    from unimage_jax.director import Director
  except ImportError as e:
    raise EvalError(f"unimage_jax.director is not available in this checkout ({e})") from None
  try:
    director = Director.from_checkpoint(workdir, step=step, use_ema=use_ema)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise EvalError(f"cannot load a director from {workdir!r}: {type(e).__name__}: {e}") from None
  if overrides:
    director.apply_overrides(overrides)
  out = []
  if true_scripts is not None:
    from unimage_jax import script_schema
    for i, r in enumerate(true_scripts):
      script = r["script"]
      images = director.draw_keyframes(script, seed=seed + i)
      out.append(metrics.score_story(metrics.StoryInput(r["story_id"], script.prompt, script, images,
                                                        script_schema.render(script), [])))
    return out
  from unimage_jax.director import DirectorError
  for i, (story_id, prompt) in enumerate(prompts):
    try:
      sb = director.direct(prompt, shots=shots, seed=seed + i)
    except DirectorError as e:  # this prompt failed (e.g. no valid script): score it, go on
      logging.warning("evaluate.py: %s: %s", story_id, e)
      out.append(metrics.failed_story(story_id, prompt, str(e)))
      continue
    out.append(metrics.score_story(metrics.from_storyboard(story_id, sb)))
  return out


# ------------------------------------------------------------------------------ outputs
def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


COLUMNS = (("stories", "stories"), ("shots", "shots"), ("validity", "validity"), ("repaired", "repaired"),
           ("interpretable", "interpretable"), ("prompt_names", "cast = prompt names"),
           ("prompt_places", "places = prompt places"), ("prompt_count", "character count"),
           ("cast_consistency", "cast consistency"), ("agreement", "agreement"),
           ("identity_consistency", "identity consistency"), ("place_accuracy", "place accuracy"),
           ("place_accuracy_changed", "place where it changes"), ("characters_drawn", "characters drawn"))


def comparison_table(rows: dict[str, dict]) -> str:
  lines = ["| label | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for label, a in rows.items():
    cells = [str(a.get(k)) if isinstance(a.get(k), int) else _fmt(a.get(k)) for k, _ in COLUMNS]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
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
        prompts_file: str | None = None, true_scripts: bool = False,
        overrides: Sequence[str] = ()) -> dict[str, dict]:
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
    if true_scripts:
      raise EvalError("--true_scripts needs the validation split, not --prompts_file")
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
    results[label] = score_checkpoint(c, prompts, shots, seed, step, use_ema, overrides=overrides)
    if true_scripts:
      results[f"{label} (true scripts)"] = score_checkpoint(c, prompts, shots, seed, step, use_ema, records, overrides)
  return write_outputs(output, results)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    averages = run(_CONFIG.value, _CHECKPOINT.value, _LABEL.value, _GROUND_TRUTH.value, _NUM_PROMPTS.value,
                   _SHOTS.value, _SEED.value, _OUTPUT.value, _STEP.value, _USE_EMA.value, _PROMPTS_FILE.value,
                   _TRUE_SCRIPTS.value, _SET.value)
  except EvalError as e:
    print(f"evaluate.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(comparison_table(averages))
  print(f"wrote {_OUTPUT.value}/comparison.md, averages.json and one JSONL per row")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors (a DirectorError while directing, ...) as one line, exit 2
