"""Script schema: exact render/parse round trip and one clear error per malformed script."""

import copy

import pytest
from hypothesis import given, settings, strategies as st

from data_pipelines.builders.storyworld import story_for
from unimage_jax import script_schema as ss


def test_round_trip_1000_storyworld_stories():
  for i in range(1000):
    script = story_for(0, "train", i).script
    ss.validate(script)
    back = ss.parse(ss.render(script))
    assert ss.scripts_equal(back, script), i
    assert ss.Script.from_dict(script.to_dict()) == script


_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="<>-"),
                min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(prompt=_text, chars=st.lists(_text, max_size=3, unique=True), envs=st.lists(_text, min_size=1, max_size=3),
       shots=st.lists(st.tuples(_text, _text), min_size=1, max_size=4))
def test_round_trip_property(prompt, chars, envs, shots):
  script = ss.Script(prompt, chars, envs, [ss.Shot(f"Close-up: {f} in <Environment1>.", v) for f, v in shots])
  ss.validate(script)
  assert ss.scripts_equal(ss.parse(ss.render(script)), script)


def _good() -> dict:
  return story_for(0, "train", 3).script.to_dict()


def _mut(fn):
  d = _good()
  fn(d)
  return d


MALFORMED = {
    "empty prompt": (_mut(lambda d: d.update(prompt="  ")), "'prompt'", "is empty"),
    "no shots": (_mut(lambda d: d.update(shots=[])), "'shots'", "at least one shot"),
    "no environments": (_mut(lambda d: (d.update(environments=[]), [s.update(frame="Wide shot: x.") for s in d["shots"]])), "'environments'", "at least one environment"),
    "unknown character": (_mut(lambda d: d["shots"][1].update(frame="Close-up: <Character9> sits in <Environment1>.")), "'frame' of shot 2", "unknown <Character9>"),
    "unknown environment": (_mut(lambda d: d["shots"][0].update(frame="Wide shot: in <Environment7>.")), "'frame' of shot 1", "unknown <Environment7>"),
    "unbalanced cue": (_mut(lambda d: d["shots"][2].update(video="She says <-hello.")), "'video' of shot 3", "unbalanced"),
    "empty cue": (_mut(lambda d: d["shots"][0].update(video="She says <-  ->")), "'video' of shot 1", "empty dialogue"),
    "control token": (_mut(lambda d: d["shots"][0].update(video="x <|im_end|>")), "'video' of shot 1", "control token"),
    "newline": (_mut(lambda d: d["shots"][1].update(video="two\nlines")), "'video' of shot 2", "single line"),
    "frame tag in text": (_mut(lambda d: d["shots"][1].update(video="as in <Frame1>")), "'video' of shot 2", "<Frame1>"),
    "tag in character": (_mut(lambda d: d["characters"].__setitem__(0, "friend of <Character2>")), "'characters[1]'", "may not reference"),
    "no place in frame": (_mut(lambda d: d["shots"][0].update(frame="Wide shot: nothing.")), "'frame' of shot 1", "where the shot happens"),
    "duplicate character": (_mut(lambda d: d.update(characters=["A.", "A."])), "'characters'", "same description"),
    "wrong type prompt": (_mut(lambda d: d.update(prompt=3)), "'prompt'", "expected str, got int"),
    "wrong type shots": (_mut(lambda d: d.update(shots={"a": 1})), "'shots'", "expected list"),
    "missing video": (_mut(lambda d: d["shots"][1].pop("video")), "'video' of shot 2", "missing"),
    "wrong type frame": (_mut(lambda d: d["shots"][0].update(frame=["x"])), "'frame' of shot 1", "expected str, got list"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_validator_rejects(name):
  data, where, what = MALFORMED[name]
  with pytest.raises(ss.ScriptError) as e:
    ss.validate(ss.Script.from_dict(data))
  assert where in str(e.value) and what in str(e.value), str(e.value)


def test_malformed_messages_are_distinct():
  messages = set()
  for data, _, _ in MALFORMED.values():
    with pytest.raises(ss.ScriptError) as e:
      ss.validate(ss.Script.from_dict(copy.deepcopy(data)))
    messages.add(str(e.value))
  assert len(messages) == len(MALFORMED) >= 10


@pytest.mark.parametrize("text,what", [
    ("<Character1>: a\n", "missing <Prompt>"),
    ("<Prompt>: p\n<Prompt>: q\n", "exactly once"),
    ("<Prompt>: p\n<Frame1>: a\n<Frame2>: b\n<Video1>: c\n", "differ"),
    ("<Prompt>: p\n<Character2>: a\n", "without gaps"),
    ("<Prompt>: p\nhello\n", "line 2"),
])
def test_parse_errors(text, what):
  with pytest.raises(ss.ScriptError, match=what):
    ss.parse(text)


def test_cues_and_references():
  v = "<Character1> says <-Hi, Bo!-> to <Character3>. <-Birds chirp->"
  assert ss.cues(v) == ["Hi, Bo!", "Birds chirp"]
  assert ss.referenced(v, "Character") == [1, 3]
