"""Ground truth of a stored StoryWorld record, rebuilt for exact evaluation.

The record's ``ground_truth`` JSON is complete: rebuilding the story from it re-renders every
stored keyframe bit for bit (tested), so an evaluator can compare a generated keyframe with the
exact expected one, or check attributes (colour, position, visibility) per character and shot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.grammar import Story
from data_pipelines.storyworld.renderer import render_shot
from unimage_jax.script_schema import Script

_STATE_KEYS = ("slot", "pose")


def story_from_record(script: Script, ground_truth: dict[str, Any]) -> Story:
  """Inverse of ``Story.ground_truth`` (plus the renderer's visibility fields, dropped)."""
  if not ground_truth or "cast" not in ground_truth:
    raise ValueError("record has no StoryWorld ground truth (user data carries none)")
  cast = [cast_lib.CharacterSpec(**c) for c in ground_truth["cast"]]
  by_name = {p.name: p for p in cast_lib.PLACES}
  places = [by_name[n] for n in ground_truth["places"]]
  shots = []
  for s in ground_truth["shots"]:
    s = dict(s)
    s["characters"] = [{k: c[k] for k in _STATE_KEYS} for c in s["characters"]]
    shots.append(s)
  return Story(script, cast, places, shots)


def expected_keyframe(script: Script, ground_truth: dict[str, Any], k: int, size: int) -> np.ndarray:
  """The exact keyframe of shot k (0-based) at ``size`` pixels, uint8 [size, size, 3]."""
  return render_shot(story_from_record(script, ground_truth), k, size)[0]


def visible_characters(ground_truth: dict[str, Any], k: int) -> list[int]:
  """0-based indices of the characters in frame in shot k."""
  return [i for i, c in enumerate(ground_truth["shots"][k]["characters"]) if c.get("visible")]
