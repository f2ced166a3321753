"""A deterministic detector for StoryWorld keyframes (no learned model).

Why hand-written: StoryWorld frames are flat colours drawn by a known renderer, so "which
character is where, how big, wearing what" is recoverable from pixels with the renderer's own
tables. Every pixel is labelled with its nearest palette colour (character colours and
accessories from ``cast.py``; place colours taken from renders of the empty places, so props are
covered without copying the renderer's literals). Each connected blob of one character colour
(scarf pixels may bridge it, as a scarf cuts a triangle in two) becomes a detection. Its shape,
size class and pose are chosen by *analysis by synthesis*: candidate bodies are drawn with the
renderer's ``draw_character`` at the size the camera implies and compared with the blob
(IoU over the pixels not hidden by accessories or other characters). Edges cut by the frame are
handled by anchoring the candidate on the sides that are not cut.

Slots and size classes are world quantities, so ``detect`` takes the camera (centre, zoom) of the
shot; without one it assumes a wide shot (the whole world in frame).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld import renderer
from data_pipelines.storyworld.grammar import NUM_SLOTS, Story

MARGIN = 0.05  # IoU margin within which a size class or shape still explains a blob


@dataclasses.dataclass
class Detection:
  """One rendered character found in a keyframe (pixel coordinates, x right, y down)."""

  colour: str
  shape: str | None  # None when too little of the body is visible to tell
  size: str | None  # size class (cast.SIZES key); None when unknown
  pose: str | None  # "standing" | "sitting" | "jumping"; None when unknown
  accessory: str | None  # "none" | "hat" | "scarf"; None when the region is out of frame
  bbox: tuple[int, int, int, int]  # visible body pixels: x0, y0, x1, y1 (end-exclusive)
  full_box: tuple[float, float, float, float]  # best-fitting whole body, may exceed the frame
  slot: int | None  # horizontal slot 0..NUM_SLOTS-1 under the given camera
  pixels: int  # visible body pixels
  fit: float  # IoU of the best candidate body (1.0 = exact)
  size_scores: dict[str, float] = dataclasses.field(default_factory=dict)  # best IoU per size class
  shape_scores: dict[str, float] = dataclasses.field(default_factory=dict)  # best IoU per shape

  def plausible(self, trait: str, margin: float = MARGIN) -> set[str]:
    """Values of 'size' or 'shape' that explain the blob within ``margin`` IoU of the best.

    Small frames (32 px) cannot always separate neighbouring size classes (1.5 px apart); the
    metrics accept a described trait that is among the plausible ones.
    """
    value = getattr(self, trait)
    if value is None:
      return set()
    scores = self.size_scores if trait == "size" else self.shape_scores
    top = max(scores.values())
    return {k for k, v in scores.items() if v >= top - margin} | {value}

  @property
  def centre_x(self) -> float:
    return (self.full_box[0] + self.full_box[2]) / 2


# --------------------------------------------------------------------------------- palette
@functools.lru_cache(maxsize=None)
def place_colours(place_name: str) -> tuple[tuple[int, int, int], ...]:
  """Every colour of an empty place (sky, ground, prop), read off renders of the empty place."""
  place = next(p for p in cast_lib.PLACES if p.name == place_name)
  # a wide shot shows the whole world, so every prop part is in frame
  story = Story(None, [], [place], [{"env": 0, "shot_size": "Wide shot", "subject": 0, "characters": []}])
  img = renderer.render_shot(story, 0, 128)[0]  # [128, 128, 3]
  return tuple(sorted(tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)))


@functools.lru_cache(maxsize=None)
def palette() -> tuple[list[str], np.ndarray]:
  """(names, colours [P, 3] float32). Names: character colour names, 'hat', 'scarf', 'bg:<place>'."""
  names, colours = [], []
  for name, rgb in cast_lib.COLOURS.items():
    names.append(name), colours.append(rgb)
  for acc, rgb in cast_lib.ACCESSORY_COLOURS.items():
    names.append(acc), colours.append(rgb)
  taken = set(map(tuple, colours))
  for place in cast_lib.PLACES:
    for rgb in place_colours(place.name):
      if rgb not in taken:  # shared prop colours (e.g. the tree) keep their first place
        names.append(f"bg:{place.name}"), colours.append(rgb)
        taken.add(rgb)
  return names, np.asarray(colours, np.float32)


def label_pixels(image: np.ndarray, tolerance: float = 60.0) -> np.ndarray:
  """Nearest palette index per pixel, -1 where nothing is within ``tolerance`` (RGB distance).

  image: uint8 [H, W, 3] -> int32 [H, W].
  """
  _, cols = palette()
  flat = image.reshape(-1, 3).astype(np.float32)  # [H*W, 3]
  d2 = ((flat[:, None, :] - cols[None, :, :]) ** 2).sum(-1)  # [H*W, P]
  idx = d2.argmin(-1)
  idx[d2[np.arange(len(idx)), idx] > tolerance ** 2] = -1
  return idx.reshape(image.shape[:2]).astype(np.int32)


# ------------------------------------------------------------------------------ templates
@functools.lru_cache(maxsize=200_000)
def _local_template(shape: str, fx: float, fy: float, w: float, h: float) -> np.ndarray:
  """Body mask drawn by the renderer's ``draw_character`` in box (fx, fy, fx + w, fy + h).

  bool [ceil(fy + h) + 1, ceil(fx + w) + 1]; fx, fy in [0, 1) are the sub-pixel offsets, so one
  cached mask serves every integer position (PIL truncates float coordinates).
  """
  cw, ch = int(np.ceil(fx + w)) + 1, int(np.ceil(fy + h)) + 1
  img = Image.new("RGB", (cw, ch), (0, 0, 0))
  spec = cast_lib.CharacterSpec("t", shape, "white", "small", "none")
  renderer.draw_character(ImageDraw.Draw(img), spec, (fx, fy, fx + w, fy + h))
  return np.asarray(img)[..., 0] > 0


def _template(shape: str, box: tuple[float, float, float, float], origin: tuple[int, int],
              canvas: tuple[int, int]) -> np.ndarray:
  """The body of ``shape`` in image-pixel ``box``, as bool [h, w] of a window at ``origin``."""
  x0, y0, x1, y1 = box
  ix, iy = int(np.floor(x0)), int(np.floor(y0))
  local = _local_template(shape, round(x0 - ix, 2), round(y0 - iy, 2), round(x1 - x0, 2), round(y1 - y0, 2))
  out = np.zeros(canvas, bool)
  oy, ox = iy - origin[1], ix - origin[0]  # local (0, 0) in window coordinates
  sy0, sx0 = max(0, -oy), max(0, -ox)
  ey, ex = min(local.shape[0], canvas[0] - oy), min(local.shape[1], canvas[1] - ox)
  if ey > sy0 and ex > sx0:
    out[oy + sy0:oy + ey, ox + sx0:ox + ex] = local[sy0:ey, sx0:ex]
  return out


@dataclasses.dataclass
class _Fit:
  iou: float
  shape: str
  size: str
  pose: str
  box: tuple[float, float, float, float]  # image pixels
  mask: np.ndarray  # bool [h, w] of the window
  size_scores: dict[str, float] = dataclasses.field(default_factory=dict)  # best IoU per size class
  shape_scores: dict[str, float] = dataclasses.field(default_factory=dict)  # best IoU per shape


class _Window:
  """A crop around a blob (with margin) where candidate bodies are drawn and compared."""

  def __init__(self, body: np.ndarray, care: np.ndarray, bbox: tuple[int, int, int, int], margin: int):
    H, W = body.shape
    x0, y0, x1, y1 = bbox
    self.x0, self.y0 = max(0, x0 - margin), max(0, y0 - margin)
    self.shape = (min(H, y1 + margin) - self.y0, min(W, x1 + margin) - self.x0)
    crop = (slice(self.y0, self.y0 + self.shape[0]), slice(self.x0, self.x0 + self.shape[1]))
    self.obs, self.care = body[crop], care[crop]

  def iou(self, mask: np.ndarray, obs: np.ndarray | None = None) -> float:
    obs = self.obs if obs is None else obs
    inter = np.count_nonzero(mask & obs & self.care)
    return inter / max(np.count_nonzero((mask | obs) & self.care), 1)


def _anchors(cut: dict[str, bool]) -> tuple[list[str], list[str]]:
  """Anchor modes to try per axis: the uncut side first ('low' = left/top), then 'both'."""
  def modes(low_cut: bool, high_cut: bool) -> list[str]:
    if low_cut and not high_cut:
      return ["high", "both"]
    if high_cut and not low_cut:
      return ["low", "both"]
    return ["both"]
  return modes(cut["left"], cut["right"]), modes(cut["top"], cut["bottom"])


def _place(a: int, b: int, length: float, mode: str) -> list[tuple[float, float]]:
  """Candidate float extents of a body whose drawn pixels span [a, b).

  PIL truncates float edges, and a polygon may drop its extreme vertex pixel, so each mode
  offers a few sub-pixel positions. 'low'/'high': only that edge is seen (the other is cut).
  """
  if mode == "low":
    return [(a + f, a + f + length) for f in (0.25, 0.75)]
  if mode == "high":
    return [(b - f - length, b - f) for f in (0.25, 0.75, 1.25)]
  c = (a + b) / 2
  steps = (-0.5, -0.25, 0.0, 0.25, 0.5) if length < 12 else (-0.5, 0.0, 0.5)  # small bodies: finer
  return [(c + d - length / 2, c + d + length / 2) for d in steps]


def _fit(win: _Window, bbox: tuple[int, int, int, int], hmodes: Sequence[str], vmodes: Sequence[str],
         zoom: float, size_px: int, obs: np.ndarray | None = None) -> _Fit:
  """Best candidate body (shape, size class, pose) placed on the blob's anchored sides.

  Candidates are tried in a fixed order and replace the best only when strictly better, so the
  first anchor mode wins ties (an edge at the frame border is more likely cut than not).
  """
  x0, y0, x1, y1 = bbox
  best = _Fit(-1.0, "", "", "", (0.0, 0.0, 0.0, 0.0), np.zeros(win.shape, bool))
  sizes: dict[str, float] = {}
  shapes: dict[str, float] = {}
  for hmode in hmodes:
    for vmode in vmodes:
      for size, height in cast_lib.SIZES.items():
        for pose in ("standing", "sitting"):
          bh = height * (renderer.SITTING_HEIGHT if pose == "sitting" else 1.0) * zoom * size_px
          bw = height * renderer.BODY_ASPECT * zoom * size_px
          for bx0, bx1 in _place(x0, x1, bw, hmode):
            for by0, by1 in _place(y0, y1, bh, vmode):
              box = (bx0, by0, bx1, by1)
              for shape in cast_lib.SHAPES:
                t = _template(shape, box, (win.x0, win.y0), win.shape)
                iou = win.iou(t, obs)
                sizes[size] = max(sizes.get(size, 0.0), iou)
                shapes[shape] = max(shapes.get(shape, 0.0), iou)
                if iou > best.iou + 1e-9:
                  best = _Fit(iou, shape, size, pose, box, t)
  best.size_scores, best.shape_scores = sizes, shapes
  return best


def _blob_fits(body: np.ndarray, care: np.ndarray, bbox: tuple[int, int, int, int], cut: dict[str, bool],
               zoom: float, size_px: int) -> list[_Fit]:
  """One body, or two when two same-coloured neighbours overlap into one blob and two explain it."""
  win = _Window(body, care, bbox, margin=size_px)
  hmodes, vmodes = _anchors(cut)
  single = _fit(win, bbox, hmodes, vmodes, zoom, size_px)
  narrowest = min(cast_lib.SIZES.values()) * renderer.BODY_ASPECT * zoom * size_px
  if single.iou >= 0.98 or bbox[2] - bbox[0] < 1.5 * narrowest:
    return [single]
  left = _fit(win, bbox, ["low"], vmodes, zoom, size_px)
  rest = win.obs & ~left.mask
  ys, xs = np.nonzero(rest)
  if len(xs) < 3:
    return [single]
  rbox = (int(xs.min()) + win.x0, int(ys.min()) + win.y0, int(xs.max()) + 1 + win.x0, int(ys.max()) + 1 + win.y0)
  right = _fit(win, (rbox[0], rbox[1], bbox[2], rbox[3]), ["high"], vmodes, zoom, size_px, obs=rest)
  pair = win.iou(left.mask | right.mask)
  if pair > single.iou + 0.05:
    left.iou = win.iou(left.mask, win.obs & ~right.mask)
    right.iou = win.iou(right.mask, win.obs & ~left.mask)
    return [left, right]
  return [single]


# ------------------------------------------------------------------------------ detection
def world_slot(centre_px: float, camera: renderer.Camera, size_px: int) -> int:
  """Slot whose centre is nearest to the world x under ``camera``."""
  cx, _, zoom = camera
  x = (centre_px / size_px - 0.5) / zoom + cx
  return int(np.clip(np.floor(x * NUM_SLOTS), 0, NUM_SLOTS - 1))


def detect(image: np.ndarray, camera: renderer.Camera | None = None, *, min_pixels: int = 4,
           tolerance: float = 60.0, max_blobs: int = 32) -> list[Detection]:
  """Characters in a keyframe. image: uint8 [S, S, 3] (any size the renderer draws)."""
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square RGB image [S, S, 3], got shape {image.shape}")
  camera = renderer.WIDE_CAMERA if camera is None else camera
  zoom = camera[2]
  S = image.shape[0]
  names, _ = palette()
  labels = label_pixels(image, tolerance)  # [S, S]
  n_char = len(cast_lib.COLOURS)
  hat, scarf = names.index("hat"), names.index("scarf")
  is_char = (labels >= 0) & (labels < n_char)  # [S, S]
  blobs = []  # (pixels, colour index, blob mask, body mask)
  for ci in range(n_char):
    own = labels == ci
    if np.count_nonzero(own) < min_pixels:
      continue
    comps, n = ndimage.label(own | (labels == scarf), structure=np.ones((3, 3), bool))
    for j in range(1, n + 1):
      blob = comps == j
      body = blob & own
      count = int(np.count_nonzero(body))
      if count >= min_pixels:
        blobs.append((count, ci, blob, body))
  # a blotchy generated frame can hold many small blobs; fitting is per blob, so keep the biggest
  blobs = sorted(blobs, key=lambda b: -b[0])[:max_blobs]
  out: list[Detection] = []
  for count, ci, blob, body in blobs:
    colour = list(cast_lib.COLOURS)[ci]
    own = labels == ci
    ys, xs = np.nonzero(body)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    cut = _cut_sides(bbox, S, is_char & ~own, labels == hat)
    care = ~((is_char & ~own) | (labels == scarf) | (labels == hat))
    fits = _blob_fits(body, care, bbox, cut, zoom, S)
    for f in fits:
      known = _visible_fraction(f.box, S) >= 0.35
      pose = f.pose
      bottom_world = (f.box[3] / S - 0.5) / zoom + camera[1]
      if pose == "standing" and bottom_world < renderer.GROUND_Y - renderer.JUMP_HEIGHT / 2:  # nearer a jump's feet
        pose = "jumping"
      own_blob = blob if len(fits) == 1 else _box_mask(blob.shape, f.box) & blob
      out.append(Detection(
          colour=colour, shape=f.shape if known else None, size=f.size if known else None,
          pose=pose if known else None, accessory=_accessory(labels, own_blob, f.box, S, hat, scarf),
          bbox=_pixel_box(body & _box_mask(body.shape, f.box)) if len(fits) > 1 else bbox,
          full_box=tuple(round(v, 2) for v in f.box),
          slot=world_slot((f.box[0] + f.box[2]) / 2, camera, S),
          pixels=count if len(fits) == 1 else int(np.count_nonzero(body & _box_mask(body.shape, f.box))),
          fit=round(float(f.iou), 3),
          size_scores={k: round(v, 3) for k, v in f.size_scores.items()},
          shape_scores={k: round(v, 3) for k, v in f.shape_scores.items()}))
  return _drop_pieces(out)


def _drop_pieces(dets: list[Detection]) -> list[Detection]:
  """Keeps one detection per body: a same-coloured blob centred inside a bigger one's fitted
  body is a piece of it (a neighbour or an accessory cut the body in two)."""
  kept: list[Detection] = []
  for d in sorted(dets, key=lambda d: -d.pixels):
    cx, cy = (d.bbox[0] + d.bbox[2]) / 2, (d.bbox[1] + d.bbox[3]) / 2
    inside = lambda k: k.full_box[0] <= cx <= k.full_box[2] and k.full_box[1] <= cy <= k.full_box[3]
    if not any(k.colour == d.colour and inside(k) for k in kept):
      kept.append(d)
  return kept


def _cut_sides(bbox, S: int, others: np.ndarray, hats: np.ndarray) -> dict[str, bool]:
  """Which sides of a blob may be hidden: at the frame edge or touching another character.

  others, hats: bool [S, S] (other characters' colours; hat colour). A hat above a body is the
  body's own accessory, so only other characters can hide its top.
  """
  x0, y0, x1, y1 = bbox
  near = others | hats
  return {
      "left": x0 == 0 or bool(np.any(near[y0:y1, x0 - 1])),
      "right": x1 == S or bool(np.any(near[y0:y1, x1])),
      "top": y0 == 0 or bool(np.any(others[y0 - 1, x0:x1])),
      "bottom": y1 == S or bool(np.any(near[y1, x0:x1])),
  }


def _box_mask(shape: tuple[int, int], box) -> np.ndarray:
  """bool [H, W]: pixels whose index lies inside a float box (as the renderer truncates)."""
  ys, xs = np.indices(shape)
  x0, y0, x1, y1 = box
  return (xs >= np.floor(x0)) & (xs <= x1) & (ys >= np.floor(y0)) & (ys <= y1)


def _pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return (0, 0, 0, 0)
  return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _visible_fraction(box, S: int) -> float:
  x0, y0, x1, y1 = box
  w = max(0.0, min(x1, S) - max(x0, 0)) / max(x1 - x0, 1e-6)
  h = max(0.0, min(y1, S) - max(y0, 0)) / max(y1 - y0, 1e-6)
  return w * h


def _accessory(labels: np.ndarray, blob: np.ndarray, box, S: int, hat: int, scarf: int) -> str | None:
  """'hat' (black band just above the body), 'scarf' (teal band across it), 'none', or None."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  hx0, hx1 = int(round(x0 + 0.25 * w)), int(round(x1 - 0.25 * w))
  hy0, hy1 = int(np.floor(y0 - renderer.HAT_HEIGHT * h)), int(np.ceil(y0))
  hat_region = labels[max(hy0, 0):max(min(hy1 + 1, S), 0), max(hx0, 0):max(min(hx1, S), 0)]
  if hat_region.size and np.any(hat_region == hat):
    return "hat"
  band = _box_mask(blob.shape, (x0 + 0.1 * w, y0 + 0.35 * h, x1 - 0.1 * w, y1 - 0.35 * h))
  if np.any(blob & band & (labels == scarf)):
    return "scarf"
  # "none" only when the places a hat or scarf would be are in frame
  my = (y0 + y1) / 2
  in_frame = hy0 >= 0 and 0 <= my < S and max(hx0, 0) < min(hx1, S)
  return "none" if in_frame else None


def detect_place(image: np.ndarray, tolerance: float = 60.0) -> str | None:
  """The place whose sky/ground/prop colours cover most of the frame (None if none shows)."""
  names, _ = palette()
  labels = label_pixels(image, tolerance)
  counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(names))
  votes: dict[str, int] = {}
  for i, name in enumerate(names):
    if name.startswith("bg:"):
      votes[name[3:]] = votes.get(name[3:], 0) + int(counts[i])
  best = max(votes, key=votes.get)
  return best if votes[best] > 0 else None
