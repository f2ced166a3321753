"""The expected picture of a shot, from the renderer: camera, body boxes and visible body pixels.

Why: "is <Character2> in frame" is only fair to ask where enough of it would be drawn. The
renderer's own visibility flag is true for a body that overlaps the frame by a fraction of a
pixel (or is hidden behind a neighbour), so the metrics and tests use the exact number of body
pixels that survive in the rendered frame, computed here by drawing every character alone with
the renderer's ``draw_character`` and replaying its ``draw_order``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld import renderer
from data_pipelines.storyworld.grammar import Story

MIN_PIXELS = 4  # fewer visible body pixels than this: not required in frame
MIN_FRACTION = 0.3  # or less than this share of the whole body in frame: not required


@dataclasses.dataclass
class ExpectedCharacter:
  index: int  # 0-based cast index
  slot: int
  pose: str
  box: tuple[float, float, float, float]  # body box in pixels (may exceed the frame)
  visible_pixels: int  # body pixels drawn and not covered by later-drawn characters
  total_pixels: int  # body pixels on an unbounded canvas

  @property
  def required(self) -> bool:
    """Enough of the body is in frame that a correct keyframe shows it recognisably."""
    return self.visible_pixels >= MIN_PIXELS and self.visible_pixels >= MIN_FRACTION * self.total_pixels

  @property
  def centre_x(self) -> float:
    return (self.box[0] + self.box[2]) / 2


def camera(story: Story, k: int) -> renderer.Camera:
  """(centre x, centre y, zoom) of shot k, as the renderer frames it."""
  return renderer.camera(story.shots[k], story.cast)


def expected_characters(story: Story, k: int, size: int) -> list[ExpectedCharacter]:
  """Per cast member (cast order): where its body is drawn in shot k and how much of it shows."""
  shot = story.shots[k]
  to_px = renderer.world_to_pixels(camera(story, k), size)
  pad = size * 3  # unbounded canvas: the frame sits at (pad, pad)
  owner = np.full((size, size), -1, np.int32)  # [S, S] last character drawn on each pixel
  bodies: dict[int, np.ndarray] = {}
  boxes, totals = {}, {}
  for i in renderer.draw_order(shot, len(story.cast)):
    spec, state = story.cast[i], shot["characters"][i]
    wx0, wy0, wx1, wy1 = renderer.body_box(spec, state["slot"], state["pose"])
    (x0, y0), (x1, y1) = to_px(wx0, wy0), to_px(wx1, wy1)
    img = Image.new("RGB", (size + 2 * pad, size + 2 * pad), (0, 0, 0))
    renderer.draw_character(ImageDraw.Draw(img), spec, (x0 + pad, y0 + pad, x1 + pad, y1 + pad))
    arr = np.asarray(img)  # [S + 2 pad, S + 2 pad, 3]
    body = np.all(arr == cast_lib.COLOURS[spec.colour], axis=-1)
    drawn = np.any(arr != 0, axis=-1)  # body and accessory both cover what is behind
    totals[i] = int(np.count_nonzero(body))
    owner[drawn[pad:pad + size, pad:pad + size]] = i
    bodies[i] = body[pad:pad + size, pad:pad + size]
    boxes[i] = (x0, y0, x1, y1)
  out = []
  for i, spec in enumerate(story.cast):
    state = shot["characters"][i]
    vis = int(np.count_nonzero(bodies[i] & (owner == i)))
    out.append(ExpectedCharacter(i, state["slot"], state["pose"], tuple(round(v, 2) for v in boxes[i]),
                                 vis, totals[i]))
  return out
