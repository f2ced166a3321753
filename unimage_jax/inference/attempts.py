"""Samples a storyboard until its script is usable: rejection sampling with the schema as the
verifier (``inference.max_attempts``, ``inference.valid_attempts``)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import ml_collections
import numpy as np

from unimage_jax.inference.keyframe_drawing import KeyframeDrawer
from unimage_jax.inference.script_repair import UnrepairableScriptError, parse_or_repair
from unimage_jax.inference.script_writing import ScriptWriter
from unimage_jax.inference.storyboard import DirectorError, Storyboard


def valid_attempts(inference: ml_collections.ConfigDict) -> int:
  return int(inference.get("valid_attempts", 1))  # checkpoints saved before the field: 1


def sample_storyboard(writer: ScriptWriter, keyframes: KeyframeDrawer, prompt: str, *, shots: int | None,
                      seed: int, mode: str, continue_from: Storyboard | None,
                      references: Sequence[np.ndarray] = ()) -> Storyboard:
  """Samples a script (with the next seed while it is unrepairable) and draws its keyframes;
  ``shots`` bounds the new shots (after those of ``continue_from``).

  The first ``inference.valid_attempts`` samples look for a script that is valid as written: a
  repairable one is kept as the fallback and the next seed is tried (each repair throws away part
  of what the model wrote). The fallback is used once those attempts are spent; after that any
  repairable script is taken.
  """
  inf = writer.inf
  n_old = len(continue_from.script.shots) if continue_from is not None else 0
  max_shots = None if shots is None else n_old + shots
  last_error, fallback = None, None
  for attempt in range(int(inf.max_attempts)):
    if fallback is not None and attempt >= valid_attempts(inf):
      return fallback
    rng = jax.random.key(seed + 1000 * attempt)
    if mode == "disentangled":
      context = continue_from.script if continue_from is not None else None
      raw = writer.write_script(prompt, rng, context, references)
    else:
      raw, images = writer.direct_interleaved(prompt, rng, max_shots, continue_from, references)
    try:
      script, repairs = parse_or_repair(raw, prompt, max_shots)
    except UnrepairableScriptError as e:
      last_error = e
      continue
    if mode == "interleaved" and not images:
      last_error = UnrepairableScriptError("the model asked for no keyframe")
      continue
    if continue_from is not None and len(script.shots) <= n_old:
      last_error = UnrepairableScriptError("the model wrote no new shot")
      continue
    needs_repair = bool(repairs)
    if needs_repair and fallback is not None:
      continue  # the first repairable script stays the fallback
    if attempt:
      repairs = [f"resampled {attempt} time(s): {last_error}"] + repairs
    if mode == "disentangled":
      earlier = continue_from.keyframes if continue_from is not None else []
      images = keyframes.draw_disentangled(script, jax.random.fold_in(rng, 1), list(earlier), references)
    elif len(images) < len(script.shots):  # a repaired script may keep a shot whose image was not drawn
      script = dataclasses.replace(script, shots=script.shots[:len(images)])
      repairs.append(f"kept the {len(images)} shots that have keyframes")
    images = images[:len(script.shots)]
    board = Storyboard(prompt, script, images, raw, repairs, mode, seed, list(references))
    if not needs_repair or attempt + 1 >= valid_attempts(inf):
      return board
    fallback, last_error = board, UnrepairableScriptError(f"attempt {attempt + 1} needed repairs: {repairs}")
  if fallback is not None:
    return fallback
  raise DirectorError(f"no valid script after {inf.max_attempts} attempts: {last_error}")
