"""The HTML storyboard in a real headless Chromium: every keyframe image is loaded and rendered."""

import json
import shutil

import numpy as np
import pytest

from unimage_jax import storyboard_io
from unimage_jax.director import Storyboard
from unimage_jax.script_schema import Script, Shot


def _storyboard(n_shots=3):
  rng = np.random.default_rng(0)
  script = Script(
      prompt="Two friends find a lantern",
      characters=["a small red circle with a hat", "a big blue square"],
      environments=["a park with a tree"],
      shots=[Shot(f"Wide shot: <Character1> stands in <Environment1> ({k}).",
                  f"<Character1> says <-Look, shot {k}!-> <-Birds sing->") for k in range(1, n_shots + 1)])
  frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n_shots)]
  return Storyboard(script.prompt, script, frames, "raw", [], "disentangled", 0)


def test_outputs_and_handoff(tmp_path):
  paths = storyboard_io.save_storyboard(_storyboard(), str(tmp_path))
  records = [json.loads(l) for l in open(paths["handoff.jsonl"])]
  assert [r["shot"] for r in records] == [1, 2, 3]
  assert records[0]["dialogue"] == [{"speaker": "<Character1>", "line": "Look, shot 1!",
                                     "speaker_name": "a small red circle with a hat",  # no name in the line
                                     "speaker_description": "a small red circle with a hat"}]
  assert records[0]["sound"] == ["Birds sing"]
  assert "a park with a tree" in records[0]["frame_prompt_expanded"]
  assert (tmp_path / records[2]["keyframe"]).exists()
  back = storyboard_io.load_storyboard(paths["storyboard.json"])
  assert back.script.shots[1].frame == _storyboard().script.shots[1].frame
  np.testing.assert_array_equal(back.keyframes[2], _storyboard().keyframes[2])


def test_dialogue_is_credited_to_the_characters_name(tmp_path):
  """A ``Name, a ...`` cast line credits its lines to the name (the HTML shows the description on
  hover); a line without a name credits the description, a tag outside the cast stays a tag."""
  board = _storyboard(2)
  board.script.characters[0] = "Mira, a small red circle with a hat."
  board.script.shots[1] = Shot("Wide shot: <Character1> stands in <Environment1>.",
                               "<Character1> says <-Hi!-> <Character2> says <-Who?->")
  paths = storyboard_io.save_storyboard(board, str(tmp_path))
  records = [json.loads(l) for l in open(paths["handoff.jsonl"])]
  assert [(d["speaker_name"], d["speaker_description"]) for d in records[1]["dialogue"]] == [
      ("Mira", "Mira, a small red circle with a hat."), ("a big blue square", "a big blue square")]
  page = open(paths["storyboard.html"]).read()
  assert '<b title="Mira, a small red circle with a hat.">Mira</b>: Hi!' in page
  assert storyboard_io.speaker_name("<Character9>", board.script) == "<Character9>"


def test_every_keyframe_renders_in_headless_chromium(tmp_path):
  webdriver = pytest.importorskip("selenium.webdriver")
  chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
  if not (chromium and driver_bin):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
  paths = storyboard_io.save_storyboard(_storyboard(4), str(tmp_path))
  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--allow-file-access-from-files"):
    opts.add_argument(arg)
  from selenium.webdriver.chrome.service import Service
  driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
  try:
    driver.get("file://" + paths["storyboard.html"])
    sizes = driver.execute_script(
        "return Array.from(document.querySelectorAll('img.keyframe')).map("
        "i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])")
    cards = driver.execute_script("return document.querySelectorAll('article.card').length")
  finally:
    driver.quit()
  assert cards == 4 and len(sizes) == 4
  for complete, w, h, shown in sizes:
    assert complete and w == 32 and h == 32 and shown > 0
