"""StoryWorld's story grammar: a small state machine that writes multi-shot scripts.

Why a state machine. The world state (which place, where each character stands, their pose)
carries from shot to shot and the frame prompts mostly state *changes* ("<Character2> walks one
step to the left"), so drawing shot k right needs the earlier shots: the look of a character comes
only from its ``<CharacterN>`` line, its position from the last absolute statement plus the moves
since. Rules a model must learn (and eval can check exactly):

* shot 1 and every arrival in a new place state every position (arrivals line up from the left);
* a step moves one of 5 slots, "runs to the far left/right" moves to slot 0/4;
* "sits down" lasts until "stands up"; a jump lasts one shot;
* wide shots frame the whole place; medium shots and close-ups centre on the shot's subject.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines.storyworld import cast as cast_lib
from unimage_jax.script_schema import Script, Shot

NUM_SLOTS = 5
SLOT_WORDS = ("at the far left", "on the left", "in the centre", "on the right", "at the far right")
SHOT_SIZES = ("Wide shot", "Medium shot", "Close-up")
LINES = ("Hello, {other}!", "Look over there, {other}.", "Do you hear that?", "What a day!",
         "Wait for me, {other}!", "I think we are lost.", "This place is lovely.",
         "Where did you go, {other}?", "Let us rest a while.", "I found something!")
SOUNDS = ("Birds chirp", "Wind blows softly", "Music turns cheerful", "Footsteps echo",
          "A bell rings", "Music turns mysterious")
CAMERAS = ("The camera holds still.", "The camera pans slowly.", "The camera pushes in.",
           "The camera pulls back.")


@dataclasses.dataclass
class Story:
  """A script with the ground truth needed to render and evaluate it exactly."""

  script: Script
  cast: list[cast_lib.CharacterSpec]
  places: list[cast_lib.PlaceSpec]
  shots: list[dict[str, Any]]  # per shot: env, shot_size, subject, event, characters{id: slot,pose}

  def ground_truth(self) -> dict[str, Any]:
    return {
        "cast": [dataclasses.asdict(c) for c in self.cast],
        "places": [p.name for p in self.places],
        "shots": self.shots,
    }


def _tag_c(i: int) -> str:
  return f"<Character{i + 1}>"


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def generate_story(rng: np.random.Generator, min_shots: int = 3, max_shots: int = 12,
                   max_characters: int = 4, max_environments: int = 3) -> Story:
  """One random story: 1..max_characters characters, 1..max_environments places."""
  n_chars = int(rng.integers(1, max_characters + 1))
  n_envs = int(rng.integers(1, max_environments + 1))
  n_shots = int(rng.integers(min_shots, max_shots + 1))
  cast = cast_lib.sample_cast(rng, n_chars)
  places = cast_lib.sample_places(rng, n_envs)

  env = 0
  slots = {i: int(s) for i, s in enumerate(sorted(rng.choice(NUM_SLOTS, n_chars, replace=False)))}
  poses = {i: "standing" for i in range(n_chars)}
  visited = {0}
  shots: list[Shot] = []
  truth: list[dict[str, Any]] = []
  for k in range(n_shots):
    # a jump lasts one shot
    poses = {i: ("standing" if p == "jumping" else p) for i, p in poses.items()}
    subject = int(rng.integers(n_chars))
    others = [i for i in range(n_chars) if i != subject]
    env_tag = f"<Environment{env + 1}>"
    if k > 0 and n_envs > 1 and rng.random() < 0.3:
      unvisited = [e for e in range(n_envs) if e not in visited]
      env = unvisited[0] if unvisited else int(rng.choice([e for e in range(n_envs) if e != env]))
      visited.add(env)
      env_tag = f"<Environment{env + 1}>"
      slots = {i: i for i in range(n_chars)}
      poses = {i: "standing" for i in range(n_chars)}
      event, size = "arrive", "Wide shot"
      who = _join([_tag_c(i) for i in range(n_chars)])
      if n_chars == 1:
        frame = f"{size}: {who} arrives in {env_tag} and stops at the far left."
        action = f"{who} walks in and looks around."
      else:
        frame = f"{size}: {who} arrive in {env_tag} and line up from the left."
        action = f"{who} walk in and look around."
    elif k == 0:
      event, size = "establish", "Wide shot"
      parts = [f"{_tag_c(i)} stands {SLOT_WORDS[slots[i]]}" for i in range(n_chars)]
      frame = f"{size}: in {env_tag}, {_join(parts)}."
      action = f"{_tag_c(subject)} looks around."
    else:
      event, frame_action, action = _event(rng, subject, slots, poses)
      size = SHOT_SIZES[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
      frame = f"{size}: {_tag_c(subject)} {frame_action} in {env_tag}."
      if size == "Wide shot" and others:
        be = "is" if len(others) == 1 else "are"
        frame = frame[:-1] + f"; {_join([_tag_c(i) for i in others])} {be} there too."
    video = action
    if others and rng.random() < 0.6:
      other = cast[int(rng.choice(others))].name
      video += f" {_tag_c(subject)} says <-{LINES[int(rng.integers(len(LINES)))].format(other=other)}->"
    video += " " + CAMERAS[int(rng.integers(len(CAMERAS)))]
    if rng.random() < 0.4:
      video += f" <-{SOUNDS[int(rng.integers(len(SOUNDS)))]}->"
    shots.append(Shot(frame=frame, video=video))
    truth.append({
        "env": env, "shot_size": size, "subject": subject, "event": event,
        "characters": [{"slot": slots[i], "pose": poses[i]} for i in range(n_chars)],
    })

  names = _join([c.name for c in cast])
  where = _join([f"the {p.name}" for p in places])
  template = ("{names} spend a day at {where}.", "A short tale of {names} at {where}.",
              "{names} wander through {where}.")[int(rng.integers(3))]
  script = Script(
      prompt=template.format(names=names, where=where),
      characters=[c.describe() for c in cast],
      environments=[p.description for p in places],
      shots=shots,
  )
  return Story(script, cast, places, truth)


def _event(rng: np.random.Generator, subject: int, slots: dict[int, int],
           poses: dict[int, str]) -> tuple[str, str, str]:
  """Picks a state change for ``subject``; mutates slots/poses. Returns (event, frame, video)."""
  me = _tag_c(subject)
  taken = set(slots.values()) - {slots[subject]}
  options = []
  s = slots[subject]
  if poses[subject] == "sitting":
    options.append("stand")
  else:
    if s - 1 >= 0 and s - 1 not in taken:
      options.append("step_left")
    if s + 1 < NUM_SLOTS and s + 1 not in taken:
      options.append("step_right")
    if s > 1 and all(x not in taken for x in range(0, s)):
      options.append("run_left")
    if s < NUM_SLOTS - 2 and all(x not in taken for x in range(s + 1, NUM_SLOTS)):
      options.append("run_right")
    options += ["sit", "jump"]
  options.append("talk")
  event = options[int(rng.integers(len(options)))]
  if event == "step_left":
    slots[subject] -= 1
    return event, "walks one step to the left", f"{me} walks slowly to the left."
  if event == "step_right":
    slots[subject] += 1
    return event, "walks one step to the right", f"{me} walks slowly to the right."
  if event == "run_left":
    slots[subject] = 0
    return event, "runs to the far left", f"{me} runs off to the left edge."
  if event == "run_right":
    slots[subject] = NUM_SLOTS - 1
    return event, "runs to the far right", f"{me} runs off to the right edge."
  if event == "sit":
    poses[subject] = "sitting"
    return event, "sits down", f"{me} sits down on the ground."
  if event == "stand":
    poses[subject] = "standing"
    return event, "stands up", f"{me} gets up again."
  if event == "jump":
    poses[subject] = "jumping"
    return event, "jumps", f"{me} jumps up high."
  verb = "talks" if poses[subject] != "sitting" else "talks while sitting"
  return event, verb, f"{me} talks and waves."
