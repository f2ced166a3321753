"""Does a checkpoint copy the prompt's names into its cast lines? (README "Diagnosing the keyframes")

  python tools/diagnose_names.py --checkpoint=runs/tiny [--num_stories=20]

Teacher-forced on held-out StoryWorld stories: at each ``<CharacterK>:`` of the true header, the
probability of the true name and of any name the prompt mentions (``evaluation/name_probe.py``).
Chance is about 1/24 for the true name (StoryWorld's name pool).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints folder).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num_stories", 20, "Held-out stories to probe.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from unimage_jax.director import Director
  from unimage_jax.evaluation.heldout import validation_records
  from unimage_jax.evaluation.name_probe import name_copy
  director = Director.from_checkpoint(_CHECKPOINT.value, step=_STEP.value)
  stats = name_copy(director, validation_records(director.config, _NUM.value))
  print(f"{_CHECKPOINT.value} (step {director.step}), {_NUM.value} held-out stories, {stats['cast_lines']} cast lines: "
        f"P(true name) {stats['p_true_name']:.3f}, P(any prompt name) {stats['p_any_prompt_name']:.3f}, "
        f"argmax = true name {stats['argmax_true_name']:.3f}, P(true name | <Character1>) "
        f"{stats['p_true_name_character1']:.3f}")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)
