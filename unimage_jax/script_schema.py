"""The multimodal script (docs/ARCHITECTURE.md §2): one schema for data, training, inference and eval.

A script is a prompt, a cast of characters, a set of environments and a list of shots. Every
mention of a character or a place is an ID tag (``<Character2>``, ``<Environment1>``): "ID
prompting" ties each identity to one tokenizer symbol, which is what lets a model keep it stable
across shots. Dialogue and sound cues are wrapped in ``<-...->``. Text form, one field per line::

    <Prompt>: ...
    <Character1>: ...
    <Environment1>: ...
    <Frame1>: Medium shot: <Character1> ...
    <Video1>: <Character1> waves. <-Hello!->

The keyframe image of shot k sits between ``<Framek>`` and ``<Videok>`` in a sequence; in the
text form it has no line (images travel beside the text). ``render``/``parse`` are exact inverses
on valid scripts; ``validate`` raises :class:`ScriptError` naming the field and shot.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from unimage_jax.errors import UserError

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
CUE_OPEN, CUE_CLOSE = "<-", "->"
TAG_KINDS = ("Prompt", "Character", "Environment", "Frame", "Video")

_LINE_RE = re.compile(rf"^<({'|'.join(TAG_KINDS)})(\d*)>: ?(.*)$")
_TAG_RE = re.compile(r"<([A-Za-z]+)(\d*)>")
_CUE_RE = re.compile(f"{re.escape(CUE_OPEN)}(.*?){re.escape(CUE_CLOSE)}")
LINE_RE, TAG_RE = _LINE_RE, _TAG_RE  # "<Tag>: text" lines and ID tags, for the director's constraints


class ScriptError(UserError, ValueError):
  """A script breaks the schema; ``field`` and ``shot`` (1-based, or None) say where."""

  def __init__(self, field: str, message: str, shot: int | None = None, line: int | None = None):
    self.field, self.shot, self.line = field, shot, line
    where = f"field {field!r}" + (f" of shot {shot}" if shot is not None else "")
    where += f" (line {line})" if line is not None else ""
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class Shot:
  """One shot: the keyframe's description, the motion/sound of the clip, optional image path."""

  frame: str
  video: str
  keyframe: str | None = None  # image path (user data) or None (image travels separately)


@dataclasses.dataclass
class Script:
  """A whole multi-shot script. Characters and environments are 1-indexed by list position."""

  prompt: str
  characters: list[str]
  environments: list[str]
  shots: list[Shot]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Any) -> "Script":
    """Builds a script from JSON-like data, checking types (errors name the field and shot)."""
    if not isinstance(d, dict):
      raise ScriptError("script", f"expected an object, got {type(d).__name__}")
    for key in ("prompt", "characters", "environments", "shots"):
      if key not in d:
        raise ScriptError(key, "missing")
    _want(d["prompt"], str, "prompt")
    for key in ("characters", "environments"):
      _want(d[key], list, key)
      for i, v in enumerate(d[key]):
        _want(v, str, f"{key}[{i}]")
    _want(d["shots"], list, "shots")
    shots = []
    for k, s in enumerate(d["shots"], start=1):
      _want(s, dict, "shots", k)
      for key in ("frame", "video"):
        if key not in s:
          raise ScriptError(key, "missing", k)
        _want(s[key], str, key, k)
      kf = s.get("keyframe")
      if kf is not None:
        _want(kf, str, "keyframe", k)
      shots.append(Shot(s["frame"], s["video"], kf))
    return cls(d["prompt"], list(d["characters"]), list(d["environments"]), shots)


def _want(value: Any, typ: type, field: str, shot: int | None = None) -> None:
  if not isinstance(value, typ):
    raise ScriptError(field, f"expected {typ.__name__}, got {type(value).__name__}", shot)


# ------------------------------------------------------------------------------------- render
def prompt_line(prompt: str) -> str:
  """``<Prompt>: ...``: the first line of a script, and all the director is given to start one."""
  return f"<Prompt>: {prompt}"


def header_lines(script: Script) -> list[str]:
  """Prompt, character and environment lines (the part every shot depends on)."""
  lines = [prompt_line(script.prompt)]
  lines += [f"<Character{i}>: {c}" for i, c in enumerate(script.characters, start=1)]
  lines += [f"<Environment{i}>: {e}" for i, e in enumerate(script.environments, start=1)]
  return lines


def frame_line(script: Script, k: int) -> str:
  """``<Framek>: ...`` for 1-based shot k."""
  return f"<Frame{k}>: {script.shots[k - 1].frame}"


def video_line(script: Script, k: int) -> str:
  return f"<Video{k}>: {script.shots[k - 1].video}"


def render(script: Script, num_shots: int | None = None) -> str:
  """Text form of the script (optionally only its first ``num_shots`` shots)."""
  n = len(script.shots) if num_shots is None else num_shots
  lines = header_lines(script)
  for k in range(1, n + 1):
    lines += [frame_line(script, k), video_line(script, k)]
  return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- parse
def parse(text: str) -> Script:
  """Inverse of :func:`render`. Raises ScriptError (with the line number) on malformed text."""
  prompt: str | None = None
  chars: dict[int, str] = {}
  envs: dict[int, str] = {}
  frames: dict[int, str] = {}
  videos: dict[int, str] = {}
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    m = _LINE_RE.match(line)
    if not m:
      raise ScriptError("line", f"expected '<Tag>: text', got {line[:40]!r}", line=n)
    kind, num, body = m.group(1), m.group(2), m.group(3)
    if kind == "Prompt":
      if num or prompt is not None:
        raise ScriptError("prompt", "must appear exactly once, without a number", line=n)
      prompt = body
      continue
    if not num:
      raise ScriptError(kind.lower(), f"<{kind}> needs a number", line=n)
    table = {"Character": chars, "Environment": envs, "Frame": frames, "Video": videos}[kind]
    idx = int(num)
    if idx in table:
      raise ScriptError(f"{kind.lower()}s", f"<{kind}{idx}> appears twice", line=n)
    table[idx] = body
  if prompt is None:
    raise ScriptError("prompt", "missing <Prompt> line")
  for name, table in (("characters", chars), ("environments", envs), ("frames", frames),
                      ("videos", videos)):
    if sorted(table) != list(range(1, len(table) + 1)):
      raise ScriptError(name, f"numbers must be 1..{len(table)} without gaps, got {sorted(table)}")
  if sorted(frames) != sorted(videos):
    raise ScriptError("shots", f"frames {sorted(frames)} and videos {sorted(videos)} differ")
  shots = [Shot(frames[k], videos[k]) for k in range(1, len(frames) + 1)]
  return Script(prompt, [chars[i] for i in sorted(chars)], [envs[i] for i in sorted(envs)], shots)


# ----------------------------------------------------------------------------------- validate
def cues(text: str) -> list[str]:
  """Dialogue and sound cues of a field: the contents of every ``<-...->``."""
  return _CUE_RE.findall(text)


def _check_text(text: str, field: str, shot: int | None, allow_tags: bool, script: Script) -> None:
  if not text.strip():
    raise ScriptError(field, "is empty", shot)
  if "\n" in text or "\r" in text:
    raise ScriptError(field, "must be a single line", shot)
  for tok in CONTROL_TOKENS:
    if tok in text:
      raise ScriptError(field, f"contains the control token {tok}", shot)
  # Cues: balanced, not nested, not empty.
  rest = _CUE_RE.sub("", text)
  if CUE_OPEN in rest or CUE_CLOSE in rest:
    raise ScriptError(field, "has an unbalanced dialogue/sound cue '<-' ... '->'", shot)
  for c in cues(text):
    if not c.strip():
      raise ScriptError(field, "has an empty dialogue/sound cue '<-->'", shot)
    if CUE_OPEN in c:
      raise ScriptError(field, "has a nested dialogue/sound cue", shot)
  for m in _TAG_RE.finditer(text):
    kind, num = m.group(1), m.group(2)
    if kind not in ("Character", "Environment") or not num:
      raise ScriptError(field, f"contains the tag {m.group(0)}; only <CharacterN> and "
                        "<EnvironmentN> may be referenced inside text", shot)
    if not allow_tags:
      raise ScriptError(field, f"may not reference {m.group(0)}", shot)
    limit = len(script.characters) if kind == "Character" else len(script.environments)
    if not 1 <= int(num) <= limit:
      raise ScriptError(field, f"references unknown {m.group(0)} (the script defines "
                        f"{limit} {kind.lower()}s)", shot)


def validate(script: Script, max_shots: int | None = None) -> Script:
  """Checks every rule of the schema; returns the script or raises ScriptError."""
  if not isinstance(script, Script):
    raise ScriptError("script", f"expected Script, got {type(script).__name__}")
  _check_text(script.prompt, "prompt", None, True, script)
  for i, c in enumerate(script.characters, start=1):
    _check_text(c, f"characters[{i}]", None, False, script)
  for i, e in enumerate(script.environments, start=1):
    _check_text(e, f"environments[{i}]", None, False, script)
  if not script.environments:
    raise ScriptError("environments", "a script needs at least one environment")
  if not script.shots:
    raise ScriptError("shots", "a script needs at least one shot")
  if max_shots is not None and len(script.shots) > max_shots:
    raise ScriptError("shots", f"{len(script.shots)} shots exceed the maximum {max_shots}")
  if len(set(script.characters)) != len(script.characters):
    raise ScriptError("characters", "two characters have the same description")
  for k, shot in enumerate(script.shots, start=1):
    _check_text(shot.frame, "frame", k, True, script)
    _check_text(shot.video, "video", k, True, script)
    if not _TAG_RE.search(shot.frame) or "<Environment" not in shot.frame:
      raise ScriptError("frame", "must say where the shot happens (an <EnvironmentN> tag)", k)
  return script


def referenced(text: str, kind: str) -> list[int]:
  """Sorted unique indices of ``<{kind}N>`` tags in text (kind: Character or Environment)."""
  return sorted({int(m.group(2)) for m in _TAG_RE.finditer(text) if m.group(1) == kind and m.group(2)})


def scripts_equal(a: Script, b: Script, ignore_keyframes: bool = True) -> bool:
  """Equality up to keyframe paths (which the text form does not carry)."""
  strip = lambda s: [(x.frame, x.video) for x in s.shots]
  same = (a.prompt, a.characters, a.environments, strip(a)) == (b.prompt, b.characters, b.environments, strip(b))
  if not ignore_keyframes:
    same = same and [x.keyframe for x in a.shots] == [x.keyframe for x in b.shots]
  return same


def id_tags(max_characters: int, max_environments: int, max_shots: int) -> list[str]:
  """Every ID tag a tokenizer should hold as a single symbol."""
  tags = ["<Prompt>"]
  tags += [f"<Character{i}>" for i in range(1, max_characters + 1)]
  tags += [f"<Environment{i}>" for i in range(1, max_environments + 1)]
  tags += [f"<Frame{i}>" for i in range(1, max_shots + 1)]
  tags += [f"<Video{i}>" for i in range(1, max_shots + 1)]
  return tags

