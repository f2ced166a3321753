"""Turning model-written text into a valid Script: parse strictly, else repair by truncation.

Strategy (documented in the README): the model's text is first parsed and validated as is. If that
fails, it is *repaired*, never rewritten: lines that are not ``<Tag>: text`` are dropped, the
``<Prompt>`` line is the user's prompt, duplicate tags keep their first occurrence, character and
environment lists keep their consecutive run from 1, and the shots are cut before the first shot
that is incomplete (no matching ``<VideoK>``) or invalid (unknown tag, no environment, empty or
broken cue). Every repair is recorded as a sentence. A script left with no shot (or an invalid
header) cannot be repaired: the director then samples again with the next seed.
"""

from __future__ import annotations

from unimage_jax import script_schema
from unimage_jax.script_schema import LINE_RE, Script, ScriptError, Shot


class UnrepairableScriptError(ValueError):
  """The text has no valid shot even after repair."""


def _consecutive(table: dict[int, str]) -> list[str]:
  out, i = [], 1
  while i in table:
    out.append(table[i])
    i += 1
  return out


def parse_or_repair(text: str, prompt: str, max_shots: int | None = None) -> tuple[Script, list[str]]:
  """(valid script, repairs); ``repairs`` is empty when ``text`` was already a valid script."""
  try:
    script = script_schema.validate(script_schema.parse(text))
    if script.prompt == prompt and (max_shots is None or len(script.shots) <= max_shots):
      return script, []
  except ScriptError:
    pass
  repairs: list[str] = []
  tables: dict[str, dict[int, str]] = {"Character": {}, "Environment": {}, "Frame": {}, "Video": {}}
  dropped = 0
  for line in text.splitlines():
    if not line.strip():
      continue
    m = LINE_RE.match(line.strip())  # the body is stripped below, so any space after ':' goes
    if not m or (m.group(1) != "Prompt" and not m.group(2)):
      dropped += 1
      continue
    kind, num, body = m.group(1), m.group(2), m.group(3).strip()
    if kind == "Prompt":
      continue
    if int(num) in tables[kind]:
      repairs.append(f"dropped a second <{kind}{num}> line")
      continue
    tables[kind][int(num)] = body
  if dropped:
    repairs.append(f"dropped {dropped} line(s) that are not '<Tag>: text'")
  characters, environments = _consecutive(tables["Character"]), _consecutive(tables["Environment"])
  for kind, kept in (("Character", characters), ("Environment", environments)):
    if len(kept) != len(tables[kind]):
      repairs.append(f"kept <{kind}1>..<{kind}{len(kept)}> (numbering gap)")
  shots: list[Shot] = []
  k = 1
  while k in tables["Frame"]:
    if k not in tables["Video"]:
      repairs.append(f"cut the script before shot {k}: no <Video{k}> line")
      break
    candidate = Script(prompt, characters, environments, shots + [Shot(tables["Frame"][k], tables["Video"][k])])
    try:
      script_schema.validate(candidate)
    except ScriptError as e:
      if e.field in ("frame", "video") and getattr(e, "shot", None) == k:
        repairs.append(f"cut the script before shot {k}: {e}")
        break
      raise UnrepairableScriptError(f"the script header is invalid: {e}") from e
    shots.append(Shot(tables["Frame"][k], tables["Video"][k]))
    if max_shots is not None and len(shots) == max_shots:
      if k + 1 in tables["Frame"]:
        repairs.append(f"kept the first {max_shots} shots (--shots)")
      break
    k += 1
  if not shots:
    raise UnrepairableScriptError(f"no valid shot in the model's text ({len(text)} characters)")
  script = script_schema.validate(Script(prompt, characters, environments, shots))
  if not repairs:
    repairs.append("replaced the <Prompt> line with the user's prompt")
  return script, repairs
