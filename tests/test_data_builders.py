"""TFDS builders: ArrayRecord without TensorFlow; the user importer's errors and skip counts."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import builders
from data_pipelines.builders.storyworld import story_for
from data_pipelines.builders.user_import import BadRecordError
from tool_runs import assert_user_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def test_storyworld_build_reads_back(tmp_path):
  b = builders.build_storyworld(str(tmp_path), num_stories=12, image_size=32, seed=3, num_validation=2)
  files = [f for f in os.listdir(b.data_dir) if "array_record" in f]
  assert files and all(".array_record-" in f for f in files)
  src = builders.load_source(str(tmp_path), "storyworld", "train")
  assert len(src) == 12 and len(builders.load_source(str(tmp_path), "storyworld", "validation")) == 2
  recs = {r["story_id"]: r for r in (builders.decode_record(src[i]) for i in range(12))}
  r = recs["train_0000004"]
  story = story_for(3, "train", 4)
  assert r["script"] == story.script
  assert len(r["keyframes"]) == len(story.script.shots)
  assert r["keyframes"][0].shape == (32, 32, 3) and r["keyframes"][0].dtype == np.uint8
  assert r["ground_truth"]["shots"][0]["characters"][0]["visible"] is True
  assert r["ground_truth"]["cast"][0]["colour"] == story.cast[0].colour


def test_missing_dataset_error_names_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
    builders.load_source(str(tmp_path), "storyworld")


# ----------------------------------------------------------------------------- storyboards
def _write_png(path, colour=(10, 200, 30), size=(40, 30)):
  Image.new("RGB", size, colour).save(path)


def _good(i: int) -> dict:
  return {"id": f"s{i}", "prompt": "Two friends meet.", "characters": ["A tall red square.", "A blue circle."],
          "environments": ["A park."],
          "shots": [{"frame": "Wide shot: <Character1> meets <Character2> in <Environment1>.",
                     "video": "<Character1> waves. <-Hi!->", "keyframe": "a.png"},
                    {"frame": "Close-up: <Character2> in <Environment1>.", "video": "She smiles.",
                     "keyframe": "b.png"}]}


def _bad_lines() -> dict:
  """kind -> (raw JSONL line, expected field)."""
  g = _good
  missing = g(100); missing["shots"][1]["keyframe"] = "nope.png"
  unreadable = g(101); unreadable["shots"][0]["keyframe"] = "broken.png"
  wrong_type = g(102); wrong_type["characters"] = "A red square."
  unknown = g(103); unknown["shots"][1]["frame"] = "Close-up: <Character5> in <Environment1>."
  empty = g(104); empty["shots"] = []
  return {
      "missing_image": (json.dumps(missing).encode(), "shots[2].keyframe"),
      "unreadable_image": (json.dumps(unreadable).encode(), "shots[1].keyframe"),
      "wrong_type": (json.dumps(wrong_type).encode(), "characters"),
      "unknown_tag": (json.dumps(unknown).encode(), "shots[2].frame"),
      "empty_script": (json.dumps(empty).encode(), "shots"),
      "non_utf8": (json.dumps(g(105)).encode().replace(b"friends", b"fri\xff\xfends"), "<line>"),
      "bad_json": (b'{"prompt": "x", ', "<line>"),
  }


@pytest.fixture
def user_dir(tmp_path):
  img = tmp_path / "images"
  img.mkdir()
  _write_png(img / "a.png")
  _write_png(img / "b.png", (200, 10, 10), (30, 50))
  (img / "broken.png").write_bytes(b"this is not a png")
  return tmp_path


@pytest.mark.parametrize("kind", sorted(_bad_lines()))
def test_each_bad_record_kind_names_file_line_field(user_dir, kind):
  raw, field = _bad_lines()[kind]
  path = user_dir / "scripts.jsonl"
  path.write_bytes(json.dumps(_good(0)).encode() + b"\n" + raw + b"\n")
  with pytest.raises(BadRecordError) as e:
    builders.build_storyboards(str(user_dir / "out"), str(path), str(user_dir / "images"), image_size=32)
  assert e.value.line == 2 and e.value.field == field and e.value.kind == kind
  assert str(e.value).startswith(f"{path}:2: field {field!r}")


def test_skip_bad_records_counts_match_planted(user_dir):
  bad = _bad_lines()
  lines, planted = [], {}
  for i in range(6):
    lines.append(json.dumps(_good(i)).encode())
  for kind, (raw, _) in bad.items():
    for _ in range(2 if kind in ("missing_image", "unknown_tag") else 1):
      lines.append(raw)
      planted[kind] = planted.get(kind, 0) + 1
  lines.append(json.dumps(_good(3)).encode())  # a duplicate id is bad too
  planted["duplicate_id"] = 1
  path = user_dir / "scripts.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  b = builders.build_storyboards(str(user_dir / "out"), str(path), str(user_dir / "images"), 32,
                                 skip_bad_records=True)
  assert b.report.imported == 6
  assert dict(b.report.skipped) == planted
  src = builders.load_source(str(user_dir / "out"), "storyboards")
  assert len(src) == 6
  r = builders.decode_record(src[0])
  assert r["keyframes"][1].shape == (32, 32, 3) and len(r["script"].shots) == 2


def test_cli_reports_counts(user_dir):
  path = user_dir / "scripts.jsonl"
  raws = [json.dumps(_good(0)).encode()] + [raw for raw, _ in _bad_lines().values()]
  path.write_bytes(b"\n".join(raws) + b"\n")
  cmd = [sys.executable, os.path.join(REPO, "tools/build_data.py"), "--dataset=storyboards",
         f"--jsonl={path}", f"--image_dir={user_dir / 'images'}", f"--data_dir={user_dir / 'out'}",
         "--image_size=32"]
  fail = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert_user_error(fail, "build_data.py", f"{path}:2: field 'shots[2].keyframe'", "--skip_bad_records")
  ok = subprocess.run(cmd + ["--skip_bad_records"], capture_output=True, text=True, cwd=REPO)
  assert ok.returncode == 0, ok.stderr
  assert f"imported 1, skipped {len(_bad_lines())} bad records" in ok.stdout


def test_round_trip_every_record_of_a_1000_story_build(tmp_path):
  """render -> parse gives back the stored script for every record of a 1,000-story build."""
  from unimage_jax import script_schema as ss
  builders.build_storyworld(str(tmp_path), num_stories=1000, image_size=32, num_validation=1)
  src = builders.load_source(str(tmp_path), "storyworld", "train")
  assert len(src) == 1000
  for i in range(len(src)):
    script = builders.decode_record(src[i], decode_images=False)["script"]
    ss.validate(script)
    assert ss.scripts_equal(ss.parse(ss.render(script)), script), i


def test_several_builds_need_a_choice(tmp_path):
  builders.build_storyworld(str(tmp_path), num_stories=3, image_size=32, num_validation=1)
  builders.build_storyworld(str(tmp_path), num_stories=4, image_size=32, num_validation=1)
  assert builders.built_configs(str(tmp_path), "storyworld") == ["n3_s32_seed0", "n4_s32_seed0"]
  with pytest.raises(FileNotFoundError, match="config.data.dataset_config"):
    builders.find_dataset_dir(str(tmp_path), "storyworld")
  assert "n4_s32" in builders.find_dataset_dir(str(tmp_path), "storyworld", prefer="n4_s32_seed0")
  assert len(builders.load_source(str(tmp_path), "storyworld", config_name="n3_s32_seed0")) == 3


def test_ground_truth_rerenders_stored_keyframes(tmp_path):
  from data_pipelines.storyworld import truth
  builders.build_storyworld(str(tmp_path), num_stories=15, image_size=32, num_validation=1)
  src = builders.load_source(str(tmp_path), "storyworld", "train")
  for i in range(len(src)):
    r = builders.decode_record(src[i])
    for k, frame in enumerate(r["keyframes"]):
      np.testing.assert_array_equal(truth.expected_keyframe(r["script"], r["ground_truth"], k, 32), frame)
    assert truth.visible_characters(r["ground_truth"], 0) == list(range(len(r["ground_truth"]["cast"])))
  with pytest.raises(ValueError, match="no StoryWorld ground truth"):
    truth.story_from_record(r["script"], {})


def test_storyboards_reimport_picks_up_a_fixed_file(user_dir):
  path = user_dir / "scripts.jsonl"
  path.write_bytes(json.dumps(_good(0)).encode() + b"\n" + _bad_lines()["missing_image"][0] + b"\n")
  b = builders.build_storyboards(str(user_dir / "out"), str(path), str(user_dir / "images"), 32, skip_bad_records=True)
  assert (b.report.imported, b.report.num_skipped) == (1, 1)
  path.write_bytes(json.dumps(_good(0)).encode() + b"\n" + json.dumps(_good(1)).encode() + b"\n")
  b = builders.build_storyboards(str(user_dir / "out"), str(path), str(user_dir / "images"), 32)
  assert (b.report.imported, b.report.num_skipped) == (2, 0)
  assert len(builders.load_source(str(user_dir / "out"), "storyboards")) == 2
