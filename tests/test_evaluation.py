"""StoryWorld evaluation: detector accuracy, script replay, metric sanity (ground truth ~1, corruptions
lower) and the evaluate tool's input errors."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np

import pytest

from configs import tiny
from data_pipelines.builders.storyworld import story_for
from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.renderer import render_shot, render_story
from unimage_jax import script_schema as ss
from unimage_jax.evaluation import detector, expected, metrics, script_semantics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import evaluate  # noqa: E402


def _detector_accuracy(size: int, stories: int, corrupt=None) -> dict[str, float]:
  """Recall of characters required in frame, and slot / size / shape accuracy of the found ones."""
  n = found = slot = size_ok = size_top1 = shape_ok = 0
  rng = np.random.default_rng(0)
  for i in range(stories):
    story = story_for(11, "validation", i)
    images, infos = render_story(story, size)
    for k, (img, info) in enumerate(zip(images, infos)):
      if corrupt is not None:
        img = corrupt(img, rng)
      dets = detector.detect(img, expected.camera(story, k))
      used = set()
      for e in expected.expected_characters(story, k, size):
        if not e.required:
          continue
        assert info[e.index]["visible"]  # the renderer's record agrees it is in frame
        spec, n = story.cast[e.index], n + 1
        cands = [j for j, d in enumerate(dets) if d.colour == spec.colour and j not in used]
        if not cands:
          continue
        j = min(cands, key=lambda j: abs(dets[j].centre_x - e.centre_x))
        used.add(j)
        d = dets[j]
        found += 1
        slot += d.slot == story.shots[k]["characters"][e.index]["slot"]
        size_ok += spec.size in d.plausible("size")
        size_top1 += d.size == spec.size
        shape_ok += spec.shape in d.plausible("shape")
  return {"recall": found / n, "slot": slot / max(found, 1), "size": size_ok / max(found, 1),
          "size_top1": size_top1 / max(found, 1), "shape": shape_ok / max(found, 1), "n": n}


def test_detector_recovers_rendered_characters():
  acc64 = _detector_accuracy(64, 20)
  print("64px", acc64)
  assert acc64["n"] > 250
  assert acc64["recall"] >= 0.98 and acc64["slot"] >= 0.98
  assert acc64["size"] >= 0.97 and acc64["size_top1"] >= 0.93 and acc64["shape"] >= 0.97
  acc32 = _detector_accuracy(32, 20)
  print("32px", acc32)
  assert acc32["recall"] >= 0.98 and acc32["slot"] >= 0.98
  assert acc32["size"] >= 0.9 and acc32["shape"] >= 0.93  # 1.5 px separate size classes at 32 px


def test_detector_degrades_on_corrupted_frames():
  noisy = lambda img, rng: np.clip(img + rng.normal(0, 70, img.shape), 0, 255).astype(np.uint8)
  scrambled = lambda img, rng: rng.permutation(img.reshape(-1, 3)).reshape(img.shape)
  for corrupt in (noisy, scrambled):
    acc = _detector_accuracy(32, 6, corrupt)
    assert acc["recall"] * acc["slot"] * acc["size"] < 0.6, acc


def test_detector_finds_place_and_accessories():
  story = story_for(11, "validation", 3)
  for k in range(len(story.shots)):
    img, _ = render_shot(story, k, 64)
    assert detector.detect_place(img) == story.places[story.shots[k]["env"]].name
  with pytest.raises(ValueError, match="square RGB"):
    detector.detect(np.zeros((8, 9, 3), np.uint8))


def test_semantics_replay_matches_recorded_ground_truth():
  checked_renders = 0
  for i in range(150):
    story = story_for(4, "train", i)
    sem = script_semantics.interpret(story.script)
    assert sem.complete
    view, truth = script_semantics.ground_truth_view(sem), story.ground_truth()
    assert view["cast"] == truth["cast"] and view["places"] == truth["places"]
    replayed = sem.story(story.script)
    for k, (a, b) in enumerate(zip(view["shots"], truth["shots"])):
      assert (a["env"], a["shot_size"], a["characters"]) == (b["env"], b["shot_size"], b["characters"]), (i, k)
      if b["event"] != "arrive":  # the arrival's subject is not in the text (draw order only)
        assert a["subject"] == b["subject"], (i, k)
      if i < 30:
        same = np.array_equal(render_shot(replayed, k, 32)[0], render_shot(story, k, 32)[0])
        assert same or b["event"] == "arrive", (i, k)
        checked_renders += 1
  assert checked_renders > 150


def test_semantics_is_tolerant():
  t = script_semantics.character_traits("Bo, a LARGE Blue square with a teal scarf")
  assert (t.name, t.size, t.colour, t.shape, t.accessory) == ("Bo", "large", "blue", "square", "scarf")
  assert not script_semantics.character_traits("Someone nice.").complete
  assert script_semantics.place_of("a windy beach").name == "beach"
  script = ss.Script("p", ["Bo, a small red circle."], ["A sandy beach."],
                     [ss.Shot("Wide shot: in <Environment1>, <Character1> stands in the centre.", "x"),
                      ss.Shot("Close-up: <Character1> dances in <Environment1>.", "y")])
  sem = script_semantics.interpret(script)
  assert sem.shots[0].read and sem.shots[0].slots == [2]
  assert not sem.shots[1].read and not sem.complete


def _inputs(size: int, n: int, seed: int = 5):
  out = []
  for i in range(n):
    story = story_for(seed, "validation", i)
    images, _ = render_story(story, size)
    out.append(metrics.StoryInput(f"s{i}", story.script.prompt, story.script, images, ss.render(story.script), []))
  return out


def _avg(inputs):
  return metrics.average([metrics.score_story(x) for x in inputs])


def test_ground_truth_scores_near_one_and_corruptions_score_lower():
  clean64 = _inputs(64, 10)
  gt = _avg(clean64)
  print("ground truth 64px", gt)
  for name in metrics.METRICS:
    assert gt[name] >= 0.97, (name, gt)
  gt32 = _avg(_inputs(32, 10))
  print("ground truth 32px", gt32)
  for name in metrics.METRICS:
    assert gt32[name] >= 0.93, (name, gt32)
  assert gt["characters_drawn"] >= 0.97 and gt32["characters_drawn"] >= 0.93, (gt, gt32)

  # keyframes of other stories
  others = _inputs(64, 10, seed=6)
  swapped = [dataclasses.replace(x, keyframes=[o.keyframes[k % len(o.keyframes)] for k in range(len(x.keyframes))])
             for x, o in zip(clean64, others)]
  sw = _avg(swapped)
  print("swapped", sw)
  assert sw["agreement"] < 0.3 and sw["cast_consistency"] < gt["cast_consistency"] - 0.2

  # each shot shows the previous shot's keyframe (the copy shortcut): the place is right wherever
  # it stays, and wrong on every shot where it changes
  copied = _avg([dataclasses.replace(x, keyframes=x.keyframes[:1] + x.keyframes[:-1]) for x in clean64])
  print("previous keyframe", copied)
  assert gt["place_accuracy_changed"] >= 0.97 and gt32["place_accuracy_changed"] >= 0.93, (gt, gt32)
  assert copied["place_accuracy_changed"] == 0.0 and copied["place_accuracy"] >= 0.5, copied

  # keyframes shuffled within the story (shifted by one shot)
  shifted = _avg([dataclasses.replace(x, keyframes=x.keyframes[1:] + x.keyframes[:1]) for x in clean64])
  print("shifted", shifted)
  assert shifted["agreement"] < gt["agreement"] - 0.15

  # every character repainted in another palette colour (identity changes, positions do not)
  def recolour(x):
    cast = [script_semantics.character_traits(c) for c in x.script.characters]
    used = {t.colour for t in cast}
    spare = [c for c in cast_lib.COLOURS if c not in used]
    frames = []
    for img in x.keyframes:
      img = img.copy()
      src = [np.all(img == cast_lib.COLOURS[t.colour], axis=-1) for t in cast]
      for mask, new in zip(src, spare):
        img[mask] = cast_lib.COLOURS[new]
      frames.append(img)
    return dataclasses.replace(x, keyframes=frames)
  rc = _avg([recolour(x) for x in clean64])
  print("recoloured", rc)
  assert rc["agreement"] < gt["agreement"] - 0.4
  assert rc["characters_drawn"] < 0.1  # the places are right, no character is
  assert rc["cast_consistency"] < gt["cast_consistency"] - 0.3

  # a character recoloured in one shot only breaks identity consistency
  def recolour_one(x):
    frames = [f.copy() for f in x.keyframes]
    t = script_semantics.character_traits(x.script.characters[0])
    spare = next(c for c in cast_lib.COLOURS if c != t.colour and c not in x.script.characters[0])
    for f in frames[: len(frames) // 2]:
      f[np.all(f == cast_lib.COLOURS[t.colour], axis=-1)] = cast_lib.COLOURS[spare]
    return dataclasses.replace(x, keyframes=frames)
  one = _avg([recolour_one(x) for x in clean64])
  print("half recoloured", one)
  assert one["identity_consistency"] < gt["identity_consistency"] - 0.1


def test_validity_and_script_cast_checks():
  x = _inputs(32, 1)[0]
  bad_raw = x.raw_text.replace("<Frame1>", "<Frame9>")
  r = metrics.score_story(dataclasses.replace(x, raw_text=bad_raw, repairs=["renumbered frames"]))
  assert r["validity"] == 0.0 and r["repaired"] and "frames" in r["validity_error"]
  twice = x.raw_text + "<Character1>: Somebody else, a tiny grey blob.\n"
  r = metrics.score_story(dataclasses.replace(x, raw_text=twice))
  assert "character1" in r["script_cast_checks"] and r["cast_consistency"] < 1.0


def test_prompt_adherence():
  """The script's cast names, places and character count against what the prompt asked for."""
  x = _inputs(32, 1)[0]
  names, places = metrics.prompt_mentions(x.prompt)
  assert names and places
  r = metrics.score_story(x)
  assert (r["prompt_names"], r["prompt_places"], r["prompt_count"]) == (1.0, 1.0, 1.0)
  # another cast: Tess and Milo asked for, a story about Mira and Nia written
  wrong = x.prompt
  for i, n in enumerate(names):
    wrong = wrong.replace(n, [m for m in cast_lib.NAMES if m not in names][i])
  r = metrics.score_story(dataclasses.replace(x, prompt=wrong))
  assert r["prompt_names"] == 0.0 and r["prompt_places"] == 1.0 and r["prompt_count"] == 1.0
  other_place = next(p.name for p in cast_lib.PLACES if p.name not in places)
  r = metrics.score_story(dataclasses.replace(x, prompt=f"{names[0]} and Zzz visit the {other_place}."))
  assert r["prompt_places"] == 0.0 and r["prompt_names"] == float(len(names) == 1)
  assert metrics.prompt_adherence("A walk in the rain.", script_semantics.interpret(x.script)) == {
      "prompt_names": None, "prompt_places": None, "prompt_count": None}
  avg = metrics.average([metrics.score_story(x)])
  assert avg["prompt_names"] == 1.0 and "cast = prompt names" in evaluate.comparison_table({"gt": avg})
  # a generated cast line with no name (no comma before its traits) is a mismatch, not a crash
  nameless = x.raw_text.replace(f"{names[0]}, ", f"{names[0]} ", 1)
  sem = script_semantics.interpret(ss.parse(nameless))
  assert None in [t.name for t in sem.cast]
  assert metrics.prompt_adherence(x.prompt, sem)["prompt_names"] == 0.0


# ---------------------------------------------------------------------------- the tool
def test_tool_errors(tmp_path):
  with pytest.raises(evaluate.EvalError, match="does not exist"):
    evaluate.check_checkpoint(str(tmp_path / "missing"))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(evaluate.EvalError, match="holds no checkpoints"):
    evaluate.check_checkpoint(str(tmp_path / "empty"))
  (tmp_path / "run" / "checkpoints" / "100").mkdir(parents=True)
  evaluate.check_checkpoint(str(tmp_path / "run"))
  with pytest.raises(evaluate.EvalError, match="prompt 2 of .* is empty"):
    evaluate.check_prompts(["a story", "  "], "x")
  with pytest.raises(evaluate.EvalError, match="not found"):
    evaluate.read_prompts_file(str(tmp_path / "nope.txt"))
  with pytest.raises(evaluate.EvalError, match="nothing to evaluate"):
    evaluate.run(tiny.get_config(), [], [], False, 3, None, 0, str(tmp_path / "o"))
  with pytest.raises(evaluate.EvalError, match="--shots"):
    evaluate.run(tiny.get_config(), [str(tmp_path / "run")], [], False, 3, 0, 0, str(tmp_path / "o"))
  with pytest.raises(evaluate.EvalError, match="--label"):
    evaluate.run(tiny.get_config(), [str(tmp_path / "run")], ["a", "b"], False, 3, None, 0, str(tmp_path / "o"))
  c = tiny.get_config()
  c.data.dataset, c.data.data_dir = "storyboards", str(tmp_path / "nodata")
  with pytest.raises(evaluate.EvalError, match="not built"):
    evaluate.validation_records(c, 3)
  proc = subprocess.run([sys.executable, "tools/evaluate.py", f"--checkpoint={tmp_path}/missing"], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr


class _PerfectDirector:
  """Stands in for unimage_jax.director: answers each validation prompt with its own story."""

  stories = {}

  @classmethod
  def from_checkpoint(cls, workdir, *, step=None, use_ema=True):
    return cls()

  def direct(self, prompt, *, shots=None, seed=0):
    record = self.stories[prompt]
    return types.SimpleNamespace(prompt=prompt, script=record["script"], keyframes=record["keyframes"],
                                 raw_text=ss.render(record["script"]), repairs=[])


class _DirectorError(ValueError):
  pass


class _FailingDirector(_PerfectDirector):
  """Fails the prompt of the second story, as a director with no valid script does."""

  def direct(self, prompt, *, shots=None, seed=0):
    if prompt == list(self.stories)[1]:
      raise _DirectorError("no valid script after 6 attempts: the script header is invalid")
    return super().direct(prompt, shots=shots, seed=seed)


def test_tool_scores_a_failed_prompt_as_zero_and_goes_on(tmp_path, monkeypatch):
  c = tiny.get_config()
  c.data.data_dir, c.data.num_stories = str(tmp_path / "data"), 40
  records = evaluate.validation_records(c, 3)
  _FailingDirector.stories = {r["script"].prompt: r for r in records}
  monkeypatch.setitem(sys.modules, "unimage_jax.director",
                      types.SimpleNamespace(Director=_FailingDirector, DirectorError=_DirectorError))
  (tmp_path / "run" / "checkpoints" / "7").mkdir(parents=True)
  avgs = evaluate.run(c, [str(tmp_path / "run")], ["d"], False, 3, None, 0, str(tmp_path / "out"))
  rows = [json.loads(l) for l in (tmp_path / "out" / "d.jsonl").read_text().splitlines()]
  assert len(rows) == 3 and avgs["d"]["stories"] == 3
  failed = rows[1]
  assert failed["validity"] == 0.0 and failed["agreement"] == 0.0 and "no valid script" in failed["director_error"]
  assert failed["prompt_names"] == 0.0 and failed["prompt_places"] == 0.0
  assert rows[0]["validity"] == 1.0 and abs(avgs["d"]["validity"] - 2 / 3) < 1e-9


def test_tool_ground_truth_and_checkpoint_rows(tmp_path, monkeypatch):
  c = tiny.get_config()
  c.data.data_dir, c.data.num_stories = str(tmp_path / "data"), 40  # 2 stored validation stories
  records = evaluate.validation_records(c, 4)  # 2 more continue the held-out stream
  assert len({r["story_id"] for r in records}) == 4
  for i, r in enumerate(records):
    assert ss.scripts_equal(r["script"], story_for(0, "validation", i).script)
  _PerfectDirector.stories = {r["script"].prompt: r for r in records}
  monkeypatch.setitem(sys.modules, "unimage_jax.director",
                      types.SimpleNamespace(Director=_PerfectDirector, DirectorError=_DirectorError))
  (tmp_path / "run" / "checkpoints" / "7").mkdir(parents=True)
  out = tmp_path / "out"
  avgs = evaluate.run(c, [str(tmp_path / "run")], ["stage-1+2"], True, 4, None, 0, str(out))
  assert set(avgs) == {evaluate.GT_LABEL, "stage-1+2"}
  assert avgs["stage-1+2"] == avgs[evaluate.GT_LABEL] and avgs["stage-1+2"]["stories"] == 4
  assert avgs["stage-1+2"]["agreement"] > 0.9
  table = (out / "comparison.md").read_text()
  assert "| stage-1+2 | 4 |" in table and "upper bound" in table
  assert len((out / "stage-1+2.jsonl").read_text().splitlines()) == 4
  assert (out / "averages.json").exists()
