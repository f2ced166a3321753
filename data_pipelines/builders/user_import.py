"""Reads a user's storyboards (JSONL of scripts + an image folder) with precise error reports.

Each JSONL line is one script: ``{"id"?: str, "prompt": str, "characters": [str],
"environments": [str], "shots": [{"frame": str, "video": str, "keyframe": "rel/path.png"}]}``.
A bad line raises :class:`BadRecordError` naming file, line and field; with
``skip_bad_records`` it is skipped and counted by kind instead, so a user sees what was dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from unimage_jax.errors import UserError
from unimage_jax.script_schema import Script, ScriptError, validate


class BadRecordError(UserError, ValueError):
  """One bad input record; ``kind`` groups the skip counts."""

  def __init__(self, path: str, line: int, field: str, kind: str, message: str):
    self.path, self.line, self.field, self.kind = path, line, field, kind
    super().__init__(f"{path}:{line}: field {field!r}: {message} [{kind}]")


class EmptyImportError(UserError, ValueError):
  """No record of the file could be imported; the skip counts (and first problems) are kept."""

  def __init__(self, path: str, report: "ImportReport"):
    self.report = report
    if not report.num_skipped:
      message = f"{path} holds no storyboard (no non-empty line)"
    else:
      message = (f"no usable record in {path}: skipped {report.num_skipped} bad records "
                 f"{dict(sorted(report.skipped.items()))}; first: " + " | ".join(report.messages[:3]))
    super().__init__(message)


@dataclasses.dataclass
class ImportReport:
  imported: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


def load_image(path: str, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to size x size; uint8 [size, size, 3]."""
  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
      im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.uint8)


def parse_line(raw: bytes, path: str, line: int, image_dir: str, image_size: int
               ) -> tuple[str, Script, list[np.ndarray]]:
  """One JSONL line -> (id, validated script, keyframes). Raises BadRecordError."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecordError(path, line, "<line>", "non_utf8", f"not valid UTF-8 at byte {e.start}") from None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecordError(path, line, "<line>", "bad_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
  try:
    script = validate(Script.from_dict(obj))
  except ScriptError as e:
    field = e.field if e.shot is None else f"shots[{e.shot}].{e.field}"
    msg = str(e).split(": ", 1)[1]
    kind = ("wrong_type" if "expected" in msg else "unknown_tag" if "unknown <" in msg
            else "empty_script" if field == "shots" else "invalid_script")
    raise BadRecordError(path, line, field, kind, msg) from None
  story_id = obj.get("id", f"line{line}")
  if not isinstance(story_id, str):
    raise BadRecordError(path, line, "id", "wrong_type", f"expected str, got {type(story_id).__name__}")
  images = []
  for k, shot in enumerate(script.shots, start=1):
    field = f"shots[{k}].keyframe"
    if shot.keyframe is None:
      raise BadRecordError(path, line, field, "missing_image", "no keyframe path given")
    img_path = os.path.join(image_dir, shot.keyframe)
    if not os.path.isfile(img_path):
      raise BadRecordError(path, line, field, "missing_image", f"image file not found: {img_path}")
    try:
      images.append(load_image(img_path, image_size))
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise BadRecordError(path, line, field, "unreadable_image", f"cannot read image {img_path}: {e}") from None
  return story_id, script, images


def read_storyboards(jsonl_path: str, image_dir: str, image_size: int, skip_bad_records: bool,
                     report: ImportReport) -> Iterator[tuple[int, str, Script, list[np.ndarray]]]:
  """Yields (line, id, script, images) for every good line; fills ``report``."""
  if not os.path.isfile(jsonl_path):
    raise FileNotFoundError(f"storyboards file not found: {jsonl_path}")
  seen: set[str] = set()
  with open(jsonl_path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        story_id, script, images = parse_line(raw.rstrip(b"\r\n"), jsonl_path, line_no, image_dir, image_size)
        if story_id in seen:
          raise BadRecordError(jsonl_path, line_no, "id", "duplicate_id", f"id {story_id!r} used twice")
        seen.add(story_id)
      except BadRecordError as e:
        if not skip_bad_records:
          raise
        report.skipped[e.kind] += 1
        report.messages.append(str(e))
        continue
      report.imported += 1
      yield line_no, story_id, script, images
