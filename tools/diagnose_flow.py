"""What does a checkpoint's keyframe velocity depend on? (README "Diagnosing the keyframes")

  python tools/diagnose_flow.py --checkpoint=runs/tiny [--num_stories=8] [--task=auto]

For held-out StoryWorld stories it noises the true keyframes, reads the velocity under the true
context and under changed ones (another story's text, no earlier keyframes, shuffled latent
positions, the wrong timestep), and prints how much the velocity moves and how far the implied
clean image ``x_t - t v`` is from the truth (``unimage_jax/evaluation/flow_probe.py``). Then the
place the context alone draws, and how far that picture moves when the frame line's place tag,
its subject tag or the cast's colours change. With ``--task=subject``, also the characters and
places that picture draws right, from the frame line as written and spelled out.
A model whose image tokens ignore their context shows changes near 0 for ``other_text``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints folder).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num_stories", 8, "Held-out stories to probe.")
_SHOTS = flags.DEFINE_integer("shots_per_story", 3, "Shots probed per story.")
_TASK = flags.DEFINE_enum("task", "auto", ["auto", "interleaved", "keyframe", "subject"],
                          "Context layout (auto: the checkpoint's director mode; subject: the header and "
                          "the shot's frame line alone, the layout of data.tasks.subject).")
_TIMESTEPS = flags.DEFINE_list("timesteps", ["0.5", "0.9"], "Noise levels t to probe.")
_SAMPLER_STEPS = flags.DEFINE_list(
    "sampler_steps", ["2", "16"],
    "--task=subject: Euler sampler timesteps (at the config's sampler shift) with which the run's own "
    "subject samples (its training layout exactly) are drawn and scored.")
flags.register_validator("sampler_steps", lambda v: all(s.isdigit() and int(s) >= 2 for s in v),
                         message="--sampler_steps must be whole numbers >= 2 (timesteps of the Euler sampler)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import numpy as np
  from data_pipelines.sequence_plan import PlanConfig, Planner
  from unimage_jax.evaluation.heldout import validation_records
  from unimage_jax.director import Director
  from unimage_jax.evaluation.flow_probe import FlowProbe, table
  director = Director.from_checkpoint(_CHECKPOINT.value, step=_STEP.value)
  records = validation_records(director.config, _NUM.value)
  config = director.config
  task = _TASK.value
  if task == "auto":
    task = "keyframe" if director.mode() == "disentangled" else "interleaved"
  planner = Planner(PlanConfig.from_config(config), director.tok)
  probe = FlowProbe(director.engine.mdef, director.engine.params, director.engine.tables, config, planner)
  stats = probe.run(records, task, timesteps=[float(t) for t in _TIMESTEPS.value], shots_per_story=_SHOTS.value)
  latents = np.concatenate([planner._image(f, noised=False).latents for r in records for f in r["keyframes"]])
  print(f"{_CHECKPOINT.value}: {task} layout, {len(records)} held-out stories, {_SHOTS.value} shots each")
  print(table(stats, float(np.var(latents))))
  by_places = probe.place_by_story_places(records, task, director.codec.decode, shots_per_story=_SHOTS.value)
  print("place drawn by the context alone (implied x0 at t = 1), by the story's number of places:")
  print("| places in the story | place accuracy | shots |\n|---|---|---|")
  for n, (acc, shots) in by_places.items():
    print(f"| {n} | {acc:.3f} | {shots} |")
  reads = probe.frame_line_reads(records, task, director.codec.decode)
  print("\nwhat the picture drawn by the context alone reads (mean |pixel change|, 0-255, when one thing changes):")
  print("| change | pixel change | shots |\n|---|---|---|")
  for name, (change, shots) in reads.items():
    print(f"| {name} | {change:.2f} | {shots} |")
  if task != "subject":
    print("\nevery shot drawn by the context alone (true script, true earlier keyframes), scored, by shot size:")
    print("| shot size | characters drawn | agreement | place accuracy | shots |\n|---|---|---|---|---|")
    for size, out in sorted(probe.drawing_by_shot_size(records, task, director.codec.decode).items()):
      drawn = "-" if out["characters_drawn"] is None else f"{out['characters_drawn']:.3f}"
      print(f"| {size} | {drawn} | {out['agreement']:.3f} | {out['place_accuracy']:.3f} | {out['shots']} |")
  if task == "subject":
    print("\nthe subject layout's picture, scored (single-character shots; the frame line as written, "
          "then with the subject's cast line in place of its tag):")
    print("| frame line | characters drawn | place accuracy | shots |\n|---|---|---|---|")
    for spelled in (False, True):
      out = probe.subject_drawing(records, director.codec.decode, spelled_out=spelled)
      drawn = "-" if out["characters_drawn"] is None else f"{out['characters_drawn']:.3f}"
      print(f"| {'spelled out' if spelled else 'tags'} | {drawn} | {out['place_accuracy']:.3f} | {out['shots']} |")
    print("\nthe run's own subject samples (its training layout: data.subject_alone, data.subject_spelled_out), "
          "drawn from noise by the Euler sampler and scored:")
    print("| sampler timesteps | characters drawn | agreement | place accuracy | shots |\n|---|---|---|---|---|")
    for steps in _SAMPLER_STEPS.value:
      out = probe.training_sample_drawing(records, "subject", director.codec.decode, sampler_steps=int(steps),
                                          shift=config.inference.timestep_shift)
      drawn = "-" if out["characters_drawn"] is None else f"{out['characters_drawn']:.3f}"
      print(f"| {steps} | {drawn} | {out['agreement']:.3f} | {out['place_accuracy']:.3f} | {out['shots']} |")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)
