"""Draws StoryWorld keyframes from the ground truth, and records what ended up in frame.

Flat colours and hard edges (no anti-aliasing) keep the images exact under the pixel codec and
make attribute checks (colour, shape, position) computable from pixels. World coordinates are in
[0, 1] x [0, 1]; a camera (centre, zoom) maps them to pixels: wide shots see the whole world,
medium shots (zoom 1.6) and close-ups (zoom 2.6) centre on the subject.

The public names below (the body geometry, the camera, the character drawing and the draw order)
are what the evaluation replays to know what a shot should show (``unimage_jax/evaluation/``).
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.grammar import NUM_SLOTS, Story

HORIZON = 0.55
GROUND_Y = 0.85  # feet of standing characters
JUMP_HEIGHT = 0.12  # feet of a jumping character above the ground
BODY_ASPECT = 0.8  # body width / standing height
SITTING_HEIGHT = 0.7  # sitting height / standing height
HAT_HEIGHT = 0.22  # hat height / body height
ZOOM = {"Wide shot": 1.0, "Medium shot": 1.6, "Close-up": 2.6}

Camera = tuple[float, float, float]  # (centre x, centre y, zoom) in world units
WIDE_CAMERA: Camera = (0.5, 0.5, 1.0)  # the whole world in frame


def slot_x(slot: int) -> float:
  return (slot + 0.5) / NUM_SLOTS


def body_box(spec: cast_lib.CharacterSpec, slot: int, pose: str) -> tuple[float, float, float, float]:
  """World box (x0, y0, x1, y1) of a character's body."""
  h = cast_lib.SIZES[spec.size]
  w = h * BODY_ASPECT
  if pose == "sitting":
    h *= SITTING_HEIGHT
  bottom = GROUND_Y - (JUMP_HEIGHT if pose == "jumping" else 0.0)
  cx = slot_x(slot)
  return cx - w / 2, bottom - h, cx + w / 2, bottom


def camera(shot: dict[str, Any], cast: list[cast_lib.CharacterSpec]) -> Camera:
  """Wide shots see the whole world; closer shots centre on the subject's body."""
  zoom = ZOOM[shot["shot_size"]]
  if zoom == 1.0:
    return WIDE_CAMERA
  subj = shot["characters"][shot["subject"]]
  x0, y0, x1, y1 = body_box(cast[shot["subject"]], subj["slot"], subj["pose"])
  return (x0 + x1) / 2, (y0 + y1) / 2, zoom


def world_to_pixels(cam: Camera, size: int) -> Callable[[float, float], tuple[float, float]]:
  """World (x, y) -> pixel (x, y) in a ``size`` frame under ``cam``."""
  cx, cy, zoom = cam
  return lambda x, y: (((x - cx) * zoom + 0.5) * size, ((y - cy) * zoom + 0.5) * size)


def draw_order(shot: dict[str, Any], n_cast: int) -> list[int]:
  """Cast indices in the order they are drawn: the subject last, on top."""
  return sorted(range(n_cast), key=lambda i: i == shot["subject"])


def render_shot(story: Story, k: int, size: int = 64) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Keyframe of shot k (0-based) as uint8 [size, size, 3], and per-character visibility/bbox."""
  shot = story.shots[k]
  place = story.places[shot["env"]]
  cam = camera(shot, story.cast)
  zoom = cam[2]
  to_px = world_to_pixels(cam, size)

  img = Image.new("RGB", (size, size), place.sky)
  draw = ImageDraw.Draw(img)
  hy = to_px(0, HORIZON)[1]
  draw.rectangle([0, hy, size, size], fill=place.ground)
  _draw_prop(draw, place, to_px, zoom, size)
  info = []
  boxes: dict[int, list[float]] = {}
  for i in draw_order(shot, len(story.cast)):
    spec, state = story.cast[i], shot["characters"][i]
    x0, y0 = to_px(*body_box(spec, state["slot"], state["pose"])[:2])
    x1, y1 = to_px(*body_box(spec, state["slot"], state["pose"])[2:])
    draw_character(draw, spec, (x0, y0, x1, y1))
    boxes[i] = [x0, y0, x1, y1]
  for i in range(len(story.cast)):
    x0, y0, x1, y1 = boxes[i]
    visible = x1 > 0 and x0 < size and y1 > 0 and y0 < size
    info.append({"visible": bool(visible), "bbox": [round(v, 2) for v in boxes[i]]})
  return np.asarray(img, np.uint8), info


def _draw_prop(draw: ImageDraw.ImageDraw, place: cast_lib.PlaceSpec, to_px, zoom: float, size: int) -> None:
  x, y = to_px(place.prop_x, HORIZON)
  u = 0.08 * zoom * size  # prop scale in pixels
  if place.prop == "tree":
    draw.rectangle([x - u * 0.15, y - u, x + u * 0.15, y], fill=(110, 70, 30))
    draw.ellipse([x - u * 0.6, y - u * 2.0, x + u * 0.6, y - u * 0.8], fill=(20, 110, 40))
  elif place.prop == "house":
    draw.rectangle([x - u, y - u * 1.2, x + u, y], fill=(200, 80, 60))
    draw.polygon([(x - u * 1.2, y - u * 1.2), (x + u * 1.2, y - u * 1.2), (x, y - u * 2.0)], fill=(90, 40, 30))
  elif place.prop == "lamp":
    draw.rectangle([x - u * 0.1, y - u * 2.0, x + u * 0.1, y], fill=(60, 60, 60))
    draw.ellipse([x - u * 0.35, y - u * 2.4, x + u * 0.35, y - u * 1.7], fill=(255, 240, 150))
  elif place.prop == "rock":
    draw.ellipse([x - u, y - u * 0.9, x + u, y + u * 0.2], fill=(80, 80, 85))
  elif place.prop == "cactus":
    draw.rectangle([x - u * 0.2, y - u * 1.8, x + u * 0.2, y], fill=(30, 130, 50))
    draw.rectangle([x - u * 0.6, y - u * 1.2, x - u * 0.2, y - u * 1.0], fill=(30, 130, 50))
  elif place.prop == "sun":
    sx, sy = to_px(place.prop_x, 0.15)
    draw.ellipse([sx - u * 0.7, sy - u * 0.7, sx + u * 0.7, sy + u * 0.7], fill=(255, 230, 60))


def draw_character(draw: ImageDraw.ImageDraw, spec: cast_lib.CharacterSpec, box) -> None:
  """A character's body and accessory in pixel box (x0, y0, x1, y1) (its body box, as drawn)."""
  x0, y0, x1, y1 = box
  colour = cast_lib.COLOURS[spec.colour]
  mx, my = (x0 + x1) / 2, (y0 + y1) / 2
  if spec.shape == "circle":
    draw.ellipse([x0, y0, x1, y1], fill=colour)
  elif spec.shape == "square":
    draw.rectangle([x0, y0, x1, y1], fill=colour)
  elif spec.shape == "triangle":
    draw.polygon([(x0, y1), (x1, y1), (mx, y0)], fill=colour)
  else:
    draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=colour)
  h = y1 - y0
  if spec.accessory == "hat":
    draw.rectangle([mx - (x1 - x0) * 0.3, y0 - h * HAT_HEIGHT, mx + (x1 - x0) * 0.3, y0], fill=cast_lib.ACCESSORY_COLOURS["hat"])
  elif spec.accessory == "scarf":
    draw.rectangle([x0 + (x1 - x0) * 0.15, my - h * 0.07, x1 - (x1 - x0) * 0.15, my + h * 0.07], fill=cast_lib.ACCESSORY_COLOURS["scarf"])


def render_story(story: Story, size: int = 64) -> tuple[list[np.ndarray], list[list[dict[str, Any]]]]:
  """Every keyframe of a story, and the per-shot visibility records (stored as ground truth)."""
  images, infos = [], []
  for k in range(len(story.shots)):
    img, info = render_shot(story, k, size)
    images.append(img)
    infos.append(info)
  return images, infos


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8)
