"""A storyboard's contact sheet: the generated keyframes above what its own script should look like.

The bottom row is the StoryWorld renderer's drawing of the scenes the script describes (the same
replay the metrics score against: ``script_semantics.interpret`` -> ``renderer.render_shot``), so a
glance shows whether each keyframe draws the place, the cast and the layout the director wrote.
Shots the script leaves undetermined (an unread frame prompt, an unknown trait) are grey.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.storyworld.renderer import render_shot
from unimage_jax.evaluation import script_semantics
from unimage_jax.script_schema import Script

UNKNOWN_GREY = (128, 128, 128)


def expected_keyframes(script: Script, size: int) -> list[np.ndarray | None]:
  """The renderer's picture of every shot of ``script`` (None when the script does not determine it)."""
  sem = script_semantics.interpret(script)
  if not sem.complete:
    return [None] * len(script.shots)
  story = sem.story(script)
  return [render_shot(story, k, size)[0] for k in range(len(script.shots))]


def contact_sheet(keyframes: Sequence[np.ndarray], script: Script, scale: int = 4, gap: int = 4) -> np.ndarray:
  """uint8 ``[2 * S * scale + 3 * gap + label, n * (S * scale + gap) + gap, 3]``: row 1 generated,
  row 2 expected; each column is labelled with its shot number."""
  size = keyframes[0].shape[0]
  expected = expected_keyframes(script, size)
  cell = size * scale
  label = 12
  height, width = label + 2 * cell + 3 * gap, len(keyframes) * (cell + gap) + gap
  sheet = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for k, (image, truth) in enumerate(zip(keyframes, expected)):
    x = gap + k * (cell + gap)
    draw.text((x, 0), f"shot {k + 1}", fill=(0, 0, 0))
    sheet.paste(Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST), (x, label + gap))
    bottom = (Image.fromarray(truth).resize((cell, cell), Image.NEAREST) if truth is not None
              else Image.new("RGB", (cell, cell), UNKNOWN_GREY))
    sheet.paste(bottom, (x, label + 2 * gap + cell))
  return np.asarray(sheet)
