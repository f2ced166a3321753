"""How script text and images become segments: the one layout the planner trains on
(``data_pipelines/sequence_plan.py``) and the director prompts with (``unimage_jax/director.py``).

* Script lines are encoded one by one (``line + "\\n"``), so a prefix of a script always has the
  same tokens as the whole script's prefix: the director continues exactly what the planner cut.
* A text segment is ``<|im_start|> ... <|im_end|>``; the ``<|im_end|>`` is left off a text that is
  cut off or still being written, so the model is never taught (or asked) to stop there.
* An image segment carries the ``<|vision_start|>``/``<|vision_end|>`` ids the packer writes
  around it.
* The interleaved layout's texts: header + ``<Frame1>`` first (its ``<|im_end|>`` asks for
  keyframe 1), then after keyframe k ``<Videok>`` and, unless k is the last shot, ``<Frame(k+1)>``.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from unimage_jax.choices import KEYFRAME_CAPTIONS
from unimage_jax.layout import ImageSegment, TextSegment, VitSegment
from unimage_jax.script_schema import Script, frame_line, header_lines, referenced, video_line


def line_ids(tok, line: str) -> list[int]:
  """One script line -> ids, with its newline."""
  return tok.encode(line + "\n")


_CAST_NAME = re.compile(r"(<Character\d+>:)\s*([^,]+)")


def name_token_span(tok, line: str, ids: Sequence[int] | None = None) -> tuple[int, int] | None:
  """Token indices ``[a, b)`` of a cast line's name within :func:`line_ids`; None for other lines.

  A ``<CharacterK>: Name, ...`` line: the tokens after ``<CharacterK>:`` up to the comma. Where
  the tokenizer merges the name's last token with what follows, the span keeps the name's first
  token, the one that copies the prompt's name. ``ids``: the line's :func:`line_ids` when the
  caller has them (the planner caches them), so the line is not encoded again.
  """
  m = _CAST_NAME.match(line)
  if m is None:
    return None
  ids = line_ids(tok, line) if ids is None else list(ids)
  head = tok.encode(m.group(1))
  if ids[:len(head)] != head:
    raise ValueError(f"cast line {line!r}: the tokenizer does not encode {m.group(1)!r} as the line's prefix")
  upto = tok.encode(line[:m.end(2)])
  end = len(upto) if ids[:len(upto)] == upto and len(upto) > len(head) else len(head) + 1
  return len(head), min(end, len(ids))


def encode_lines(tok, lines: Sequence[str]) -> list[int]:
  """Script lines -> ids, each line encoded separately with its newline."""
  return [i for line in lines for i in line_ids(tok, line)]


def framed(tok, ids: Sequence[int], *, close: bool = True) -> list[int]:
  """``<|im_start|> ids [<|im_end|>]``; ``close=False`` for a cut-off or still-open text."""
  return [tok.im_start] + list(ids) + ([tok.im_end] if close else [])


def text_segment(tok, ids: Sequence[int], *, train: bool, close: bool = True) -> TextSegment:
  """A text segment of already-encoded lines (see :func:`framed`)."""
  return TextSegment(np.asarray(framed(tok, ids, close=close), np.int32), train=train)


def image_segment(tok, latents: np.ndarray, height: int, width: int, noised: bool) -> ImageSegment:
  """VAE-latent tokens ``[h*w, D]`` between the image markers."""
  return ImageSegment(latents, height, width, noised, tok.vision_start, tok.vision_end)


def vit_segment(tok, patches: np.ndarray, height: int, width: int) -> VitSegment:
  """ViT patches ``[h*w, p*p*3]`` between the image markers."""
  return VitSegment(patches, height, width, tok.vision_start, tok.vision_end)


def first_text_lines(script: Script) -> list[str]:
  """The interleaved layout's first text: prompt, cast, places and ``<Frame1>``."""
  return header_lines(script) + [frame_line(script, 1)]


_CHARACTER_TAG = re.compile(r"<Character(\d+)>")


def spelled_out_frame_line(script: Script, k: int) -> str:
  """``<Framek>:`` with each ``<CharacterN>`` replaced by its cast line ("Ona, a small green
  triangle wearing a teal scarf,"): a diagnostic layout that removes the tag lookup, so a probe
  can tell a model that cannot resolve tags from one that cannot draw what it is told."""
  spell = lambda m: script.characters[int(m.group(1)) - 1].rstrip(".") + ","
  return f"<Frame{k}>: " + _CHARACTER_TAG.sub(spell, script.shots[k - 1].frame)


def caption_lines(lines: Sequence[str], frame: str, kind: str) -> list[str]:
  """The keyframe caption (``data.keyframe_caption``) of the shot whose frame line is ``frame``:
  the definition lines among ``lines`` (the header, or the script text written so far) of what
  the frame line names, the places last (nearest the picture). ``kind``: ``none``; ``place`` (the
  ``<EnvironmentK>`` lines); ``subject_place`` (also the ``<CharacterK>`` line of a frame that
  names one character: a medium shot or close-up's subject); ``cast_place`` (every named
  character's line). A tag that ``lines`` does not define contributes nothing.

  Why: the place of shot k is the frame line's ``<EnvironmentK>`` resolved through the K-th
  environment line, a two-read lookup the tiny model does not form; copying the previous keyframe
  pays instead, and is wrong where the place changes (README, "Diagnosing the keyframes"). A
  caption segment right before the picture holds the description itself, one read away.
  """
  if kind not in KEYFRAME_CAPTIONS:
    raise ValueError(f"keyframe caption {kind!r} must be one of {KEYFRAME_CAPTIONS}")
  if kind == "none":
    return []
  cast = named_definition_lines(lines, frame, "Character")
  if kind == "place" or (kind == "subject_place" and len(cast) != 1):
    cast = []
  return cast + named_definition_lines(lines, frame, "Environment")


def named_definition_lines(header: Sequence[str], frame: str, kind: str) -> list[str]:
  """The ``<{kind}K>`` lines of ``header`` (kind: Character or Environment) for the tags the
  ``frame`` line names, in tag order (none for a tag the header lacks)."""
  defined = definitions(header, kind)
  return [defined[k] for k in referenced(frame, kind) if k in defined]


def definitions(lines: Sequence[str], kind: str) -> dict[int, str]:
  """``{K: the first <{kind}K>: line of lines}`` (kind: Character or Environment)."""
  defined: dict[int, str] = {}
  for line in lines:
    m = re.match(rf"<{kind}(\d+)>:", line)
    if m is not None:
      defined.setdefault(int(m.group(1)), line)
  return defined


def tail_lines(script: Script, k: int) -> list[str]:
  """The interleaved layout's text after keyframe k (1-based)."""
  return [video_line(script, k)] + ([frame_line(script, k + 1)] if k < len(script.shots) else [])
