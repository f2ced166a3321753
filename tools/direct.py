"""Directs a storyboard: prompt -> script -> keyframes -> JSON, PNGs, HTML and a video hand-off.

  python tools/direct.py --checkpoint=runs/tiny --prompt="Mila and Odo find a lantern" --output=runs/story
  python tools/direct.py --checkpoint=runs/tiny --continue_from=runs/story/storyboard.json \
      --prompt="Night falls" --shots=2 --output=runs/story2
  python tools/direct.py --checkpoint=runs/tiny --heldout_story=0 --output=runs/story  # a held-out prompt
  python tools/direct.py --checkpoint=runs/tiny_vae --prompt="..." --reference_images=hero.png,inn.png
Sampling settings are the checkpoint config's ``inference`` block, overridable with --set key=value.
A StoryWorld-style storyboard is also scored with the exact StoryWorld metrics (printed, and saved
as score.json) and drawn as contact_sheet.png: the keyframes above the renderer's picture of the
script the director wrote.
"""

import json
import os

from absl import app, flags

from unimage_jax import cli
from unimage_jax.config_validation import INFERENCE_MODES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ dir).", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "The user's prompt (one line).")
_HELDOUT = flags.DEFINE_integer("heldout_story", None, "Instead of --prompt: the prompt of this held-out "
                                "StoryWorld validation story (0-based, as tools/evaluate.py orders them).")
_OUTPUT = flags.DEFINE_string("output", "runs/storyboard", "Output directory.")
_SHOTS = flags.DEFINE_integer("shots", None, "Upper bound on the number of (new) shots.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_MODE = flags.DEFINE_enum("mode", None, list(INFERENCE_MODES), "Director layout.")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Use the raw params even when an EMA is saved.")
_CONTINUE = flags.DEFINE_string("continue_from", None, "storyboard.json of a story to continue.")
_REFS = flags.DEFINE_list("reference_images", [], "Comma-separated image files (character sheets, places) "
                          "every part of the storyboard sees as context; a continued storyboard keeps its own.")
_SET = flags.DEFINE_multi_string("set", [], "Override an inference setting, e.g. --set=cfg_text_scale=3.")


def _score_and_sheet(sb, story_id: str, out_dir: str) -> dict[str, str]:
  """Exact StoryWorld metrics of the storyboard and its contact sheet (files in ``out_dir``)."""
  from PIL import Image
  from unimage_jax.evaluation import contact_sheet, metrics
  if not sb.keyframes:
    return {}
  result = metrics.score_story(metrics.from_storyboard(story_id, sb))
  paths = {"score": os.path.join(out_dir, "score.json"), "contact_sheet": os.path.join(out_dir, "contact_sheet.png")}
  with open(paths["score"], "w") as f:
    json.dump(result, f, indent=2)
  Image.fromarray(contact_sheet.contact_sheet(sb.keyframes, sb.script)).save(paths["contact_sheet"])
  keys = ("validity", "prompt_names", "prompt_places", "prompt_count", "agreement", "identity_consistency")
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  shots = result.get("per_shot", [])
  place = fmt(sum(s["place_ok"] for s in shots) / len(shots)) if shots else "-"
  print(f"StoryWorld score of {story_id}: " + ", ".join(f"{k} {fmt(result.get(k))}" for k in keys)
        + f", place accuracy {place} (where it changes {fmt(metrics.place_accuracy_changed(shots))})"
        + f", characters drawn {fmt(metrics.characters_drawn(shots))}"
        + f", interpretable {result['interpretable']}")
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_PROMPT.value is None) == (_HELDOUT.value is None):
    raise app.UsageError("pass exactly one of --prompt and --heldout_story")
  if _HELDOUT.value is not None and _HELDOUT.value < 0:
    raise app.UsageError(f"--heldout_story={_HELDOUT.value} must be >= 0")
  from unimage_jax.director import Director
  from unimage_jax import storyboard_io
  from unimage_jax.evaluation.heldout import validation_records
  # everything the flags decide, before the checkpoint is read or anything is compiled
  storyboard_io.check_output_dir(_OUTPUT.value)
  context = storyboard_io.load_storyboard(_CONTINUE.value) if _CONTINUE.value else None
  references = storyboard_io.read_images(_REFS.value) if _REFS.value else (context.references if context else [])
  director = Director.from_checkpoint(_CHECKPOINT.value, step=_STEP.value, use_ema=not _NO_EMA.value)
  director.apply_overrides(_SET.value)
  prompt, story_id = _PROMPT.value, "prompt"
  if _HELDOUT.value is not None:
    record = validation_records(director.config, _HELDOUT.value + 1)[_HELDOUT.value]
    prompt, story_id = record["script"].prompt, record["story_id"]
    print(f"held-out story {story_id}: {prompt}")
  sb = director.direct(prompt, shots=_SHOTS.value, seed=_SEED.value, mode=_MODE.value,
                       continue_from=context, references=references)
  paths = storyboard_io.save_storyboard(sb, _OUTPUT.value)
  paths.update(_score_and_sheet(sb, story_id, _OUTPUT.value))
  print(f"{len(sb.script.shots)} shots ({sb.mode}, checkpoint step {director.step}); repairs: {sb.repairs or 'none'}")
  for name, path in paths.items():
    print(f"  {name}: {path}")


if __name__ == "__main__":
  cli.run(main)
