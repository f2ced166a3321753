"""Does the director copy the prompt's names into its cast lines? (README "Diagnosing the keyframes")

Teacher-forced: for each ``<CharacterK>:`` of a held-out story's true header, the probability the
model gives the true name (the K-th the prompt mentions) and any name of the prompt, after the
prompt and the true earlier cast lines, encoded as the planner encodes them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from unimage_jax import layout, script_schema
from unimage_jax.prompt_layout import encode_lines, framed


def cast_prefixes(tok, script: script_schema.Script) -> list[tuple[list[int], int]]:
  """Per cast line K: (token ids up to and including ``<CharacterK>:``, the true name's id)."""
  lines = script_schema.header_lines(script)
  cast = [line for line in lines if line.startswith("<Character")]
  out = []
  for k, line in enumerate(cast):
    tag, colon, name = tok.encode(line)[:3]  # "<CharacterK>", ":", the name's (first) token, ...
    out.append((framed(tok, encode_lines(tok, [lines[0]] + cast[:k]) + [tag, colon], close=False), name))
  return out


def name_copy(director, records: list[dict[str, Any]], capacity: int = 512) -> dict[str, float]:
  """Mean P(true name), P(any prompt name), share of argmax = true name, and P(true name) of
  ``<Character1>`` alone, over every cast line of ``records``."""
  tok, engine = director.tok, director.engine
  p_true, p_any, hits, first = [], [], [], []
  for r in records:
    prefixes = cast_prefixes(tok, r["script"])
    names = [name for _, name in prefixes]
    for k, (ids, name) in enumerate(prefixes):
      segment = layout.TextSegment(np.asarray(ids, np.int32), train=False)
      _, logits = engine.prefill(engine.new_cache(1, capacity), [[segment]])
      p = np.asarray(jax.nn.softmax(np.asarray(logits[0], np.float32)))  # [V]
      p_true.append(p[name]); p_any.append(p[sorted(set(names))].sum()); hits.append(np.argmax(p) == name)
      if k == 0:
        first.append(p[name])
  return {"cast_lines": len(p_true), "p_true_name": float(np.mean(p_true)), "p_any_prompt_name": float(np.mean(p_any)),
          "argmax_true_name": float(np.mean(hits)), "p_true_name_character1": float(np.mean(first))}
