"""The director's mechanics on a small random model, its repair strategy and its error messages."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import data_fixtures
from data_pipelines.builders import decode_record, load_source
from unimage_jax import script_schema
from unimage_jax.director import Director, DirectorError
from unimage_jax.inference.script_repair import UnrepairableScriptError, parse_or_repair
from unimage_jax.model import functional
from unimage_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
GOOD = """<Prompt>: ignored
<Character1>: Nia, a small pink circle.
<Environment1>: A park with one tree.
<Frame1>: Wide shot: <Character1> stands in <Environment1>.
<Video1>: <Character1> waves. <Character1> says <-Hi!->
<Frame2>: Close-up: <Character1> jumps in <Environment1>.
<Video2>: <Character1> lands.
"""


def test_valid_text_needs_no_repair_but_the_prompt():
  script, repairs = parse_or_repair(GOOD.replace("ignored", "A walk"), "A walk")
  assert repairs == [] and len(script.shots) == 2


@pytest.mark.parametrize("text,shots,expect", [
    (GOOD + "<Frame3>: Wide shot: <Character1> sits in <Environment1>.\n", 2, "no <Video3> line"),
    (GOOD + "<Frame3>: Wide shot: <Character4> sits in <Environment1>.\n<Video3>: x\n", 2, "unknown <Character4>"),
    (GOOD.replace("<Video1>:", "garbage <Video1>:"), None, None),
    (GOOD + "this line is noise\n", 2, "not '<Tag>: text'"),
    (GOOD + "<Frame2>: again\n", 2, "second <Frame2>"),
])
def test_repairs_truncate_and_say_what_they_did(text, shots, expect):
  if shots is None:
    with pytest.raises(UnrepairableScriptError):
      parse_or_repair(text, "A walk")
    return
  script, repairs = parse_or_repair(text, "A walk")
  assert len(script.shots) == shots and script.prompt == "A walk"
  assert any(expect in r for r in repairs), repairs
  script_schema.validate(script)


def test_max_shots_bounds_the_script():
  script, repairs = parse_or_repair(GOOD, "ignored", max_shots=1)
  assert len(script.shots) == 1 and any("first 1 shots" in r for r in repairs)


@pytest.fixture(scope="module")
def director():
  c = data_fixtures.tiny_config()
  c.model.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.inference.update(num_steps=3, cache_capacity=1024)
  params, tables = functional.init_params(c.model, 0)
  return Director(c, params, tables, Tokenizer(c.data.tokenizer_path, c.model.vocab_size))


def test_keyframes_for_a_script_with_guidance_rows(director):
  c = director.config
  source = load_source(c.data.data_dir, "storyworld", "validation")
  record = decode_record(source[0])
  script = record["script"]
  n = min(3, len(script.shots))
  script = script_schema.Script(script.prompt, script.characters, script.environments, script.shots[:n])
  images = director.keyframes.draw_disentangled(script, jax.random.key(0), [])
  assert len(images) == n and all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
  # continuation: earlier keyframes are context, only the new shots are drawn
  more = director.keyframes.draw_disentangled(script, jax.random.key(1), images[:1])
  np.testing.assert_array_equal(more[0], images[0])
  assert len(more) == n


def test_bad_prompts_are_refused(director):
  for prompt, message in (("", "empty"), ("two\nlines", "one line"), ("x <|im_end|>", "control tokens")):
    with pytest.raises(DirectorError, match=message):
      director.direct(prompt)
  with pytest.raises(DirectorError, match="--shots=0"):
    director.direct("A walk", shots=0)


def test_prompt_and_cache_capacity_are_checked_before_generating(director):
  with pytest.raises(DirectorError, match=r"the prompt is \d+ tokens, too long for .*cache_capacity=1024") as e:
    director.direct("word " * 10000)
  assert "tools/direct.py --set=cache_capacity=N" in str(e.value)  # the flag that raises it, by its real name
  director.inf.cache_capacity = 40
  try:
    with pytest.raises(DirectorError, match="config.inference.cache_capacity=40 cannot hold one 32px keyframe"):
      director.direct("A walk")
    with pytest.raises(DirectorError, match=r"--set=cache_capacity=40"):
      director.check_settings(prefix="--set=")
  finally:
    director.inf.cache_capacity = 1024
  temperature, director.inf.temperature = director.inf.temperature, -1.0
  try:
    with pytest.raises(DirectorError, match=r"temperature=-1.0 must be >= 0"):
      director.direct("A walk")
  finally:
    director.inf.temperature = temperature


def test_cli_names_a_missing_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "tools/direct.py", f"--checkpoint={tmp_path}/nope", "--prompt=hi"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and f"{tmp_path}/nope does not exist" in out.stderr


def test_the_director_does_not_import_the_data_pipelines():
  """The director and its probes take the segment layout from unimage_jax/prompt_layout.py, as the
  planner does; the data package depends on the model package, never the other way."""
  code = ("import sys, unimage_jax.director, unimage_jax.evaluation.name_probe, unimage_jax.vae.training; "
          "print(sorted(m for m in sys.modules if m.startswith('data_pipelines')))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout


def test_name_probe_reads_the_cast_lines_as_the_planner_trains_them(director):
  from data_pipelines.sequence_plan import PlanConfig, Planner
  from unimage_jax.evaluation.heldout import validation_records
  from unimage_jax.evaluation.name_probe import cast_prefixes, name_copy
  records = validation_records(director.config, 2)
  planner = Planner(PlanConfig.from_config(director.config), director.tok)
  lines = 0
  for r in records:
    trained = planner.plan(r, np.random.default_rng(0), "header").segments[0].token_ids.tolist()
    for ids, name in cast_prefixes(director.tok, r["script"]):
      assert trained[:len(ids) + 1] == ids + [name]  # the probe's prefix, then the true name
      lines += 1
  stats = name_copy(director, records)
  assert stats["cast_lines"] == lines
  assert 0.0 <= stats["p_true_name"] <= stats["p_any_prompt_name"] <= 1.0


def test_guidance_settings_on_an_interleaved_director_say_they_do_nothing(director, caplog):
  import copy
  import logging
  d = Director(copy.deepcopy(director.config), director.engine.params, director.engine.tables, director.tok)
  assert d.mode() == "interleaved"  # the tiny config's stage-1 mixture
  with caplog.at_level(logging.WARNING):
    d.apply_overrides(["temperature=0.5"])
    assert "guidance" not in caplog.text
    d.apply_overrides(["cfg_text_scale=3", "cfg_img_scale=2"])
  assert "--set cfg_img_scale, cfg_text_scale: classifier-free guidance applies to the disentangled layout only" \
      in caplog.text
  d.inf.mode = "disentangled"
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    d.apply_overrides(["cfg_text_scale=3"])
  assert "guidance" not in caplog.text


def test_valid_attempts_resample_a_repairable_script_and_fall_back_to_the_first(director, monkeypatch):
  """inference.valid_attempts: rejection sampling with the schema as the verifier."""
  repairable = GOOD.replace("ignored", "A walk") + "<Frame3>: Close-up: <Character1> sits in <Environment9>.\n"
  valid = GOOD.replace("ignored", "A walk")
  image = np.zeros((32, 32, 3), np.uint8)

  def run(texts, valid_attempts):
    calls = []

    def fake(prompt, rng, max_shots, context, references):
      calls.append(prompt)
      return texts[len(calls) - 1], [image] * 3

    monkeypatch.setattr(director.writer, "direct_interleaved", fake)
    monkeypatch.setitem(director.inf, "valid_attempts", valid_attempts)
    return director.direct("A walk", mode="interleaved"), len(calls)

  board, n = run([repairable, valid], 3)  # the second sample is valid as written: it is taken
  assert n == 2 and board.raw_text == valid and script_schema.parse(board.raw_text)
  assert board.repairs and board.repairs[0].startswith("resampled 1 time(s): attempt 1 needed repairs")
  board, n = run([repairable] * 3, 3)  # none valid: the first repairable one, with its repairs
  assert n == 3 and board.raw_text == repairable and len(board.script.shots) == 2
  assert not board.repairs[0].startswith("resampled")
  board, n = run([repairable, valid], 1)  # 1: the first repairable script, as before
  assert n == 1 and board.raw_text == repairable


def test_schema_constraints_ban_the_tags_a_chunk_after_a_keyframe_may_not_use(director):
  from unimage_jax.inference import schema_constraints
  assert schema_constraints.defined_counts(GOOD) == (1, 1)
  banned = director.writer.banned_after_keyframe(GOOD.split("<Frame2>")[0], next_frame=2)
  ids = director.tok.special_ids
  allowed = {"<Character1>", "<Environment1>", "<Frame2>"}
  for tag in ("<Prompt>", "<Character2>", "<Environment2>", "<Environment8>", "<Frame1>", "<Frame3>",
              "<Video1>", "<Video2>"):
    assert banned[ids[tag]], tag
  for tag in allowed:
    assert not banned[ids[tag]], tag
  assert int(banned.sum()) == sum(1 for s in ids if script_schema.TAG_RE.fullmatch(s) and not s.startswith("<|")) - len(allowed)
  assert not banned[director.tok.im_end] and not banned[director.tok.encode("walks")].any()
  director.apply_overrides(["schema_constrained=false"])
  try:
    assert director.writer.banned_after_keyframe(GOOD, next_frame=3) is None
  finally:
    director.apply_overrides(["schema_constrained=true"])
  with pytest.raises(DirectorError, match="schema_constrained=maybe"):
    director.apply_overrides(["schema_constrained=maybe"])


TWO_PLACES = """<Prompt>: A walk
<Character1>: Nia, a small pink circle.
<Environment1>: A park with one tree.
<Environment2>: A dim cave.
<Frame1>: Wide shot: <Character1> stands in <Environment1>.
<Video1>: <Character1> waves.
<Frame2>: Close-up: <Character1> jumps in <Environment2>.
<Video2>: <Character1> lands.
"""


@pytest.fixture(scope="module")
def captioned_director():
  c = data_fixtures.tiny_config(keyframe_caption="place")
  c.model.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.inference.update(num_steps=2, cache_capacity=1024)
  params, tables = functional.init_params(c.model, 0)
  return Director(c, params, tables, Tokenizer(c.data.tokenizer_path, c.model.vocab_size))


def _record_layout(director, monkeypatch) -> list[tuple]:
  """What the director puts in its cache, in order: ("T", text ids) / ("C",) per prefilled
  segment, ("N",) per keyframe sampled."""
  from unimage_jax.layout import TextSegment
  seen: list[tuple] = []
  prefill, sample = director.engine.prefill, director.keyframes.sample

  def recording_prefill(cache, rows):
    seen.extend(("T", s.token_ids.tolist()) if isinstance(s, TextSegment) else ("C",) for s in rows[0])
    return prefill(cache, rows)

  def recording_sample(cache, rng, rows):
    seen.append(("N",))
    return sample(cache, rng, rows)

  monkeypatch.setattr(director.engine, "prefill", recording_prefill)
  monkeypatch.setattr(director.keyframes, "sample", recording_sample)
  return seen


def test_place_caption_director_lays_out_the_planners_interleaved_sample(captioned_director, monkeypatch):
  """Teacher-forced drawing with ``data.keyframe_caption="place"``: the director's cache holds the planner's
  interleaved sample, caption segments included, token for token, each keyframe sampled where the
  planner put its noised copy."""
  from data_pipelines.sequence_plan import PlanConfig, Planner
  from unimage_jax.layout import TextSegment
  d = captioned_director
  script = script_schema.parse(TWO_PLACES)
  seen = _record_layout(d, monkeypatch)
  images = d.keyframes.draw_interleaved(script, jax.random.key(0), [])
  assert len(images) == 2
  planner = Planner(PlanConfig.from_config(d.config), d.tok)
  record = {"story_id": "two", "script": script, "keyframes": images}
  trained = [("T", s.token_ids.tolist()) if isinstance(s, TextSegment) else ("N",) if s.noised else ("C",)
             for s in planner.plan(record, np.random.default_rng(0), "interleaved").segments]
  assert seen == trained[:len(seen)] and len(seen) == len(trained) - 2  # all but keyframe 2's clean copy and <Video2>
  texts = [d.tok.decode(x[1][1:-1]).strip() for x in seen if x[0] == "T"]
  captions = [t for t in texts if t.startswith("<Environment")]
  assert captions == ["<Environment1>: A park with one tree.", "<Environment2>: A dim cave."]


def test_place_caption_free_run_writes_the_caption_of_the_frame_line_it_wrote(captioned_director, monkeypatch):
  """Free run: after the model closes a ``<Framek>`` line, the director prefills the caption of the
  place that line names (from the environment lines the model wrote), then samples the keyframe."""
  d = captioned_director
  header = TWO_PLACES.split("<Frame1>")[0].split("\n", 1)[1]  # what the model writes after the prompt line
  chunks = [header + "<Frame1>: Wide shot: <Character1> stands in <Environment1>.\n",
            ": <Character1> waves.\n<Frame2>: Close-up: <Character1> jumps in <Environment2>.\n",  # after <Video1>
            ": <Character1> lands.\n"]  # after <Video2>: no frame line, the storyboard ends
  seen = _record_layout(d, monkeypatch)

  def scripted_generate(cache, logits, rng, max_new, banned=None):
    return cache, chunks.pop(0), True  # each chunk closed by <|im_end|>

  monkeypatch.setattr(d.writer, "generate", scripted_generate)
  text, images = d.writer.direct_interleaved("A walk", jax.random.key(0), None, None)
  assert len(images) == 2 and "<Frame2>" in text
  before_sample = [seen[i - 1] for i, x in enumerate(seen) if x == ("N",)]
  assert [d.tok.decode(ids[1:-1]).strip() for _, ids in before_sample] == \
      ["<Environment1>: A park with one tree.", "<Environment2>: A dim cave."]
  # the room kept free for a caption when deciding whether a shot fits: the longest place line
  from unimage_jax.prompt_layout import line_ids
  places = [line for line in TWO_PLACES.splitlines() if line.startswith("<Environment")]
  assert d.layout.caption_room(TWO_PLACES.splitlines()) == max(len(line_ids(d.tok, p)) for p in places) + 2
  assert d.layout.caption_room(["<Prompt>: A walk"]) == 2  # nothing defined yet
