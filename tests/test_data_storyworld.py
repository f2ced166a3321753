"""StoryWorld: reproducible stories whose shots depend on earlier shots, rendered consistently."""

import re

import numpy as np
import pytest

from data_pipelines.builders.storyworld import story_for
from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.grammar import NUM_SLOTS, SLOT_WORDS
from data_pipelines.storyworld.renderer import render_shot, render_story
from unimage_jax import script_schema as ss


def test_generation_is_deterministic_and_in_range():
  shots, chars, envs = set(), set(), set()
  for i in range(300):
    a, b = story_for(7, "train", i), story_for(7, "train", i)
    assert a.script == b.script and a.shots == b.shots
    shots.add(len(a.script.shots)), chars.add(len(a.cast)), envs.add(len(a.places))
  assert min(shots) == 3 and max(shots) == 12
  assert chars == {1, 2, 3, 4} and envs == {1, 2, 3}
  assert story_for(7, "train", 0).script != story_for(8, "train", 0).script


def _replay_positions(story):
  """Positions predicted from the frame texts alone, shot after shot (what a model must do)."""
  n = len(story.cast)
  slots, env = {}, None
  for k, shot in enumerate(story.script.shots):
    f = shot.frame
    if k == 0:
      for m in re.finditer(r"<Character(\d+)> stands (" + "|".join(SLOT_WORDS) + ")", f):
        slots[int(m.group(1)) - 1] = SLOT_WORDS.index(m.group(2))
    elif " arrive" in f:
      slots = {i: i for i in range(n)}
    else:
      subj = ss.referenced(f.split(" in <Environment")[0], "Character")[0] - 1
      if "one step to the left" in f:
        slots[subj] -= 1
      elif "one step to the right" in f:
        slots[subj] += 1
      elif "far left" in f:
        slots[subj] = 0
      elif "far right" in f:
        slots[subj] = NUM_SLOTS - 1
    env = ss.referenced(f, "Environment")[0] - 1
    yield k, dict(slots), env


def test_positions_follow_from_previous_shots():
  moved_without_restating = 0
  for i in range(200):
    story = story_for(0, "train", i)
    for k, slots, env in _replay_positions(story):
      truth = story.shots[k]
      assert env == truth["env"]
      assert slots == {j: c["slot"] for j, c in enumerate(truth["characters"])}, (i, k)
      moved_without_restating += truth["event"].startswith(("step", "run"))
  assert moved_without_restating > 100  # many shots need the earlier shots to be drawn right


def test_identity_is_stable_in_pixels():
  """A character's body colour at its box centre is its cast colour in every shot it is seen."""
  checked = 0
  for i in range(40):
    story = story_for(0, "train", i)
    images, infos = render_story(story, 64)
    for k, (img, info) in enumerate(zip(images, infos)):
      for j, ch in enumerate(info):
        x0, y0, x1, y1 = ch["bbox"]
        cx, cy = int((x0 + x1) / 2), int(y0 + 0.75 * (y1 - y0))
        if not (0 <= cx < 64 and 0 <= cy < 64) or story.cast[j].accessory != "none":
          continue
        others = [o for o in range(len(info)) if o != j and info[o]["visible"]]
        if any(info[o]["bbox"][0] <= cx <= info[o]["bbox"][2] and info[o]["bbox"][1] <= cy <= info[o]["bbox"][3] for o in others):
          continue  # occluded by another character
        assert tuple(img[cy, cx]) == cast_lib.COLOURS[story.cast[j].colour], (i, k, j)
        checked += 1
  assert checked > 100


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_size_configurable(size):
  img, info = render_shot(story_for(0, "train", 1), 0, size)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  assert all(v["visible"] for v in info)  # the establishing wide shot shows everyone
  assert len(np.unique(img.reshape(-1, 3), axis=0)) >= 3


def test_character_mask_is_exactly_the_pixels_the_characters_paint(monkeypatch):
  """``cast.character_mask`` (the character flow-loss weight's pixels) against the same shots
  rendered without their characters: a pixel is in the mask iff drawing the cast changed it."""
  from data_pipelines.storyworld import renderer
  stories = [story_for(0, "train", i) for i in range(12)]
  shots = [(s, k) for s in stories for k in range(len(s.shots))]
  with_cast = [render_shot(s, k, 32)[0] for s, k in shots]
  monkeypatch.setattr(renderer, "draw_character", lambda *args, **kwargs: None)
  without = [render_shot(s, k, 32)[0] for s, k in shots]
  painted = 0
  for a, b in zip(with_cast, without):
    changed = np.any(a != b, axis=-1)
    np.testing.assert_array_equal(cast_lib.character_mask(a), changed)
    assert not cast_lib.character_mask(b).any()  # no place uses a character colour
    painted += int(changed.sum())
  assert painted > 0.05 * 32 * 32 * len(shots)  # the shots do show characters
