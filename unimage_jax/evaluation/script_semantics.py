"""What a StoryWorld-style script means: cast traits, places, and the scene state of every shot.

The frame prompts mostly state *changes*, so the scene of shot k is found by replaying the
grammar's wording from shot 1 (the same vocabulary tables as ``grammar.py``). Model-written
scripts may stray, so parsing is tolerant: whatever cannot be read is reported (``unknown``
traits, ``unread`` shots) instead of raising.

Assumptions where the grammar's text is silent or ambiguous:

* every cast member is always in the current place (the grammar never splits the cast); medium
  shots and close-ups do not name the others, but they are drawn wherever the camera sees them;
* "arrive(s) in <EnvironmentN>" puts the whole cast in slots 0, 1, ... by cast order, standing;
* the subject of a shot is the first <CharacterN> of its frame prompt; for a wide establishing
  or arrival shot, where the frame names all, it is the first character of the video prompt
  (which the grammar writes first) - it only decides who is drawn on top there;
* a character whose position was never stated (shot 1 did not place it) has slot None, and a
  shot's expected scene then leaves it out; moves are clamped to the slots 0..4;
* a jump lasts one shot; "sits down" lasts until "stands up" (as in the grammar).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.grammar import NUM_SLOTS, SHOT_SIZES, SLOT_WORDS, Story
from unimage_jax.script_schema import Script, referenced

_WORD = re.compile(r"[a-z]+")
_CHAR = re.compile(r"<Character(\d+)>")
_STANDS = re.compile(r"<Character(\d+)> stands (" + "|".join(map(re.escape, SLOT_WORDS)) + ")")
# frame action wording (grammar._event writes these literals; it has no table to import) ->
# (slot change, new pose). Longer phrases first ("talks while sitting" before "talks"); the
# replay test against generated stories catches any drift from the grammar.
_ACTIONS = (
    ("walks one step to the left", ("step", -1), None),
    ("walks one step to the right", ("step", 1), None),
    ("runs to the far left", ("to", 0), None),
    ("runs to the far right", ("to", NUM_SLOTS - 1), None),
    ("sits down", None, "sitting"),
    ("stands up", None, "standing"),
    ("jumps", None, "jumping"),
    ("talks while sitting", None, None),
    ("talks", None, None),
)
_ACCESSORY_WORDS = {"hat": "hat", "scarf": "scarf"}


@dataclasses.dataclass
class Traits:
  """A character as its <CharacterN> line describes it; None where the line does not say."""

  name: str | None
  shape: str | None
  colour: str | None
  size: str | None
  accessory: str  # "none" when no accessory is named

  @property
  def complete(self) -> bool:
    return None not in (self.name, self.shape, self.colour, self.size)

  def spec(self) -> cast_lib.CharacterSpec:
    return cast_lib.CharacterSpec(self.name or "?", self.shape, self.colour, self.size, self.accessory)


@dataclasses.dataclass
class ShotState:
  """The scene a shot's frame prompt implies (after replaying every earlier shot)."""

  env: int | None  # 0-based environment index
  shot_size: str | None
  subject: int | None  # 0-based cast index
  event: str | None
  slots: list[int | None]  # per cast member
  poses: list[str]
  read: bool  # the frame prompt was understood (shot size, place and action)


@dataclasses.dataclass
class Semantics:
  cast: list[Traits]
  places: list[cast_lib.PlaceSpec | None]
  shots: list[ShotState]

  @property
  def complete(self) -> bool:
    """Everything needed to draw every shot is known."""
    return (all(t.complete for t in self.cast) and all(p is not None for p in self.places)
            and all(s.read and s.env is not None and None not in s.slots for s in self.shots))

  def story(self, script: Script | None = None) -> Story:
    """A renderable ``Story`` of the expected scenes (requires ``complete``)."""
    if not self.complete:
      raise ValueError("the script does not determine every shot's scene")
    shots = [{"env": s.env, "shot_size": s.shot_size, "subject": s.subject, "event": s.event,
              "characters": [{"slot": sl, "pose": p} for sl, p in zip(s.slots, s.poses)]} for s in self.shots]
    return Story(script, [t.spec() for t in self.cast], list(self.places), shots)


def character_traits(text: str) -> Traits:
  """Traits from ``CharacterSpec.describe()`` wording ("Mira, a small red circle wearing a black hat.").

  Tolerant: words are looked up anywhere in the line; the name is the text before the first comma.
  """
  words = _WORD.findall(text.lower())
  pick = lambda table: next((w for w in words if w in table), None)
  name = text.split(",", 1)[0].strip() if "," in text else None
  accessory = next((_ACCESSORY_WORDS[w] for w in words if w in _ACCESSORY_WORDS), "none")
  return Traits(name or None, pick(cast_lib.SHAPES), pick(cast_lib.COLOURS), pick(cast_lib.SIZES), accessory)


def place_of(text: str) -> cast_lib.PlaceSpec | None:
  """The place an <EnvironmentN> line describes: its exact description, else its name word."""
  for p in cast_lib.PLACES:
    if text.strip() == p.description:
      return p
  words = set(_WORD.findall(text.lower()))
  return next((p for p in cast_lib.PLACES if p.name in words), None)


def _shot_size(frame: str) -> str | None:
  return next((s for s in SHOT_SIZES if frame.startswith(s + ":")), None)


def interpret(script: Script) -> Semantics:
  """Replays the script's frame prompts into per-shot scene states."""
  cast = [character_traits(c) for c in script.characters]
  places = [place_of(e) for e in script.environments]
  n = len(cast)
  slots: list[int | None] = [None] * n
  poses = ["standing"] * n
  env: int | None = None
  states = []
  for k, shot in enumerate(script.shots):
    frame = shot.frame
    poses = ["standing" if p == "jumping" else p for p in poses]
    size = _shot_size(frame)
    envs = [e - 1 for e in referenced(frame, "Environment") if 1 <= e <= len(places)]
    chars = [int(m.group(1)) - 1 for m in _CHAR.finditer(frame) if 1 <= int(m.group(1)) <= n]
    video_chars = [int(m.group(1)) - 1 for m in _CHAR.finditer(shot.video) if 1 <= int(m.group(1)) <= n]
    read = size is not None and bool(envs)
    event = None
    subject = chars[0] if chars else None
    if re.search(r"\barrives? in <Environment", frame):
      event = "arrive"
      slots = [i if i < NUM_SLOTS else None for i in range(n)]
      poses = ["standing"] * n
      subject = video_chars[0] if video_chars else subject
    elif k == 0 or _STANDS.search(frame):
      event = "establish"
      for m in _STANDS.finditer(frame):
        i = int(m.group(1)) - 1
        if 0 <= i < n:
          slots[i] = SLOT_WORDS.index(m.group(2))
      subject = video_chars[0] if video_chars else subject
      read = read and bool(_STANDS.search(frame))
    else:
      action = next((a for a in _ACTIONS if a[0] in frame), None)
      read = read and action is not None and subject is not None
      if action is not None and subject is not None:
        event = action[0]
        move, pose = action[1], action[2]
        if move is not None and slots[subject] is not None:
          slots[subject] = min(max(slots[subject] + move[1] if move[0] == "step" else move[1], 0), NUM_SLOTS - 1)
        if pose is not None:
          poses[subject] = pose
    if envs:
      env = envs[0]
    states.append(ShotState(env, size, subject if subject is not None else 0, event, list(slots), list(poses), read))
  return Semantics(cast, places, states)


def ground_truth_view(sem: Semantics) -> dict[str, Any]:
  """The replayed semantics in ``Story.ground_truth()`` form (for comparison in tests)."""
  return {
      "cast": [dataclasses.asdict(t.spec()) for t in sem.cast],
      "places": [p.name if p else None for p in sem.places],
      "shots": [{"env": s.env, "shot_size": s.shot_size, "subject": s.subject,
                 "characters": [{"slot": sl, "pose": p} for sl, p in zip(s.slots, s.poses)]} for s in sem.shots],
  }
