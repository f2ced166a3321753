"""Tags the script schema forbids in the text the director samples after a keyframe.

Why. In the interleaved layout the header (cast, places) is written before the first keyframe,
so every later chunk (``<Videok>`` line, then a ``<Framek+1>`` line or the end) has a fixed set
of legal ID tags: references to the characters and places the header defined, the next frame's
tag and nothing else. A sampled ``<Environment2>`` in a one-place script, a second ``<Videok>``
or a skipped frame number makes the whole script invalid (``script_schema.validate``); masking
those tags out of the logits (constrained decoding, as JSON-schema samplers do) keeps what the
model wrote valid without changing any other choice it makes.
"""

from __future__ import annotations

import numpy as np

from unimage_jax.script_schema import LINE_RE, TAG_KINDS, TAG_RE


def defined_counts(text: str) -> tuple[int, int]:
  """(characters, environments) defined by ``<CharacterN>:`` / ``<EnvironmentN>:`` lines of ``text``."""
  found = {"Character": set(), "Environment": set()}
  for line in text.splitlines():
    m = LINE_RE.match(line.strip())
    if m and m.group(1) in found and m.group(2):
      found[m.group(1)].add(int(m.group(2)))
  return len(found["Character"]), len(found["Environment"])


def banned_after_keyframe(special_ids: dict[str, int], vocab_size: int, characters: int,
                          environments: int, next_frame: int) -> np.ndarray:
  """Boolean ``[vocab_size]``: the ID tags that may not follow keyframe ``next_frame - 1``.

  Allowed: ``<CharacterN>`` for N <= ``characters``, ``<EnvironmentN>`` for N <= ``environments``
  and ``<Frame{next_frame}>``; banned: every other ID tag (``<Prompt>``, every ``<VideoN>``,
  which the director writes itself, other frame numbers, undefined references).
  """
  limit = {"Character": characters, "Environment": environments}
  banned = np.zeros(vocab_size, bool)
  for symbol, token in special_ids.items():
    m = TAG_RE.fullmatch(symbol)
    if m is None or m.group(1) not in TAG_KINDS or token >= vocab_size:
      continue
    kind, num = m.group(1), int(m.group(2) or 0)
    allowed = num <= limit[kind] if kind in limit else (kind == "Frame" and num == next_frame)
    banned[token] = not allowed
  return banned
