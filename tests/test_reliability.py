"""Faults and bad input (README "Reliability"): nothing is lost, and every error names what is wrong.

Checkpoint faults run in-process on the micro config (synthetic data); tool-level behaviour runs the
tools as a user would (``tool_runs``), a few checks per process where that stays readable.
"""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

import data_fixtures
from tool_runs import REPO, assert_user_error, run_tool
from unimage_jax import sharding
from unimage_jax.config_loading import load_config
from unimage_jax.config_validation import ConfigError
from unimage_jax.interchange import export, orbax_io
from unimage_jax.model import functional
from unimage_jax.training import checkpointing, loop
from unimage_jax.training.metrics import DISCARDED_NAME, read_metrics
from unimage_jax.training.train_setup import setup_train

MICRO = "tests/micro_config.py"


def _micro(workdir, **train):
  c = load_config(MICRO)
  c.train.update(workdir=str(workdir), **train)
  return c


def _tree(path: pathlib.Path) -> dict[str, bytes]:
  """Every file under ``path`` with its bytes (to show a folder was left exactly as it was)."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


LEFTOVER = "1.orbax-checkpoint-tmp-1712345678"
OLD_METRICS = [json.dumps({"step": s, "loss": 9.0 + s}) + "\n" for s in (1, 2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step micro run (checkpoints at steps 1 and 2) started over what a run killed during its
  first save leaves behind: an unfinished ``<step>.orbax-checkpoint-tmp-*`` and metrics lines.
  Returns (workdir, warnings logged); tests copy the workdir."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  (workdir / "checkpoints" / LEFTOVER / "params").mkdir(parents=True)
  (workdir / "checkpoints" / LEFTOVER / "params" / "_METADATA").write_text("{")
  (workdir / "metrics.jsonl").write_text("".join(OLD_METRICS))
  records = _Records()
  logging.getLogger().addHandler(records)
  try:
    loop.train(_micro(workdir, steps=2, checkpoint_every=1), devices=jax.devices()[:1])
  finally:
    logging.getLogger().removeHandler(records)
  return workdir, "\n".join(records.lines)


@pytest.fixture
def run_copy(trained, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(trained[0], dst)
  return dst


# ------------------------------------------------------------------------------ every tool
def test_every_tool_reports_the_projects_errors_through_cli_run():
  """Each tool's entry point is ``cli.run`` (one-line ``tool: error: ...``, exit 2), never bare ``app.run``."""
  tools = sorted((REPO / "tools").glob("*.py"))
  assert len(tools) >= 15
  for tool in tools:
    text = tool.read_text()
    assert "cli.run(main)" in text, f"{tool.name} does not run through unimage_jax.cli.run"
    assert "app.run(" not in text, f"{tool.name} still calls app.run"


def test_train_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  proc = run_tool("train.py", f"--config={MICRO}", f"--workdir={tmp_path}/a", "--config.train.keep_checkpoints=0",
                  "--config.train.log_every=0", "--config.inference.temperature=-1")
  assert_user_error(proc, "train.py", "config.train.keep_checkpoints=0 must be >= 1",
                    "config.train.log_every=0 must be >= 1", "config.inference.temperature=-1.0 must be >= 0")
  assert not (tmp_path / "a").exists()  # refused before anything was written
  proc = run_tool("train.py", f"--config={MICRO}", f"--workdir={tmp_path}/b", "--config.train.stepz=3")
  assert_user_error(proc, "train.py", "--config.train.stepz: no such config field", '"steps"')


# ------------------------------------------------------------------------------ checkpoints
def test_a_changed_model_is_refused_before_anything_is_written(run_copy):
  before = _tree(run_copy)
  c = _micro(run_copy, steps=4)
  c.model.num_layers = 3
  c.optim.ema_decay = 0.999
  with pytest.raises(ConfigError) as e:
    loop.train(c, devices=jax.devices()[:1])
  message = str(e.value)
  assert "config.model.num_layers: 2 in the checkpoints, 3 now" in message
  assert "config.optim.ema_decay > 0: False in the checkpoints, True now" in message
  assert _tree(run_copy) == before  # config.json, checkpoints and metrics untouched
  proc = run_tool("train.py", f"--config={MICRO}", f"--workdir={run_copy}", "--config.train.steps=4",
                  "--config.model.num_layers=3")  # the same, as a user runs it
  assert_user_error(proc, "train.py", "config.model.num_layers: 2 in the checkpoints, 3 now")
  assert _tree(run_copy) == before
  # readers take each step's own config, so even a rewritten config.json (3 layers) cannot mislead them
  (run_copy / "checkpoints" / "config.json").write_text(c.to_json())
  assert orbax_io.load_checkpoint(str(run_copy)).config.model.num_layers == 2
  # execution-only fields may change on resume
  c = _micro(run_copy, steps=4)
  c.model.remat_policy, c.model.attention_query_chunk = "full", 64
  checkpointing.check_resume(c, str(run_copy / "checkpoints"))


def test_init_from_without_checkpoints_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ConfigError, match=r"config.train.init_from='.*nowhere' holds no checkpoint steps"):
    loop.train(_micro(tmp_path / "new", steps=2, init_from=str(tmp_path / "nowhere")), devices=jax.devices()[:1])
  assert not (tmp_path / "new").exists()


def test_init_from_trains_with_an_ema(run_copy, tmp_path):
  """Stage 2 from stage 1 with an EMA: the EMA starts as a copy of the loaded params (the step
  donates both; shared buffers failed at the first step)."""
  c = _micro(tmp_path / "stage2", steps=2, init_from=str(run_copy))
  c.optim.ema_decay = 0.9
  result = loop.train(c, devices=jax.devices()[:1])
  assert result["step"] == 2 and np.isfinite(result["loss"])
  assert orbax_io.finished_steps(str(tmp_path / "stage2" / "checkpoints"))[-1] == 2


def test_steps_below_the_saved_step_say_so(run_copy, caplog):
  with pytest.raises(ConfigError, match=r"config.train.steps=1 is below the newest checkpoint's step 2"):
    loop.train(_micro(run_copy, steps=1), devices=jax.devices()[:1])
  with caplog.at_level(logging.WARNING):
    last = loop.train(_micro(run_copy, steps=2), devices=jax.devices()[:1])
  assert last["already_done"] and last["step"] == 2 and last["loss"] == read_metrics(str(run_copy))[-1]["loss"]
  assert "already at step 2 = config.train.steps: nothing to train" in caplog.text


def test_leftover_unfinished_save_is_reported_and_old_metrics_are_kept(trained):
  """The fixture's run started over a killed run's leftovers: it says so and keeps what it replaces."""
  workdir, warnings = trained
  assert f"{LEFTOVER} is an unfinished save" in warnings and "left in place" in warnings
  assert "no finished checkpoint" in warnings and "starts from step 0" in warnings
  assert [m["step"] for m in read_metrics(str(workdir))] == [1, 2]
  assert (workdir / DISCARDED_NAME).read_text() == "".join(OLD_METRICS)  # the earlier lines are kept
  assert (workdir / "checkpoints" / LEFTOVER).is_dir()
  assert orbax_io.finished_steps(str(workdir / "checkpoints")) == [1, 2]


def _truncate_data_files(item_dir: pathlib.Path) -> None:
  for f in item_dir.rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array chunks, not the metadata
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_no_readable_step_moves_nothing_aside(run_copy):
  ckpt_dir = run_copy / "checkpoints"
  for step in (1, 2):
    _truncate_data_files(ckpt_dir / str(step) / "params")
  c = _micro(run_copy, steps=4)
  setup = setup_train(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  ckpt = checkpointing.Checkpointer(str(ckpt_dir), c)
  with pytest.raises(checkpointing.NoUsableCheckpointError, match=r"step 2: .*\n.*step 1: "):
    ckpt.restore_latest(setup.abstract, setup.shardings, None)
  ckpt.close()
  assert orbax_io.finished_steps(str(ckpt_dir)) == [1, 2]
  assert not list(ckpt_dir.glob("*.corrupt*"))


def _two_step_checkpoint(workdir: pathlib.Path, config):
  """Steps 1 and 2 of one model with different weights (save_params: the import tools' format)."""
  params, tables = functional.init_params(config.model, 0)
  out = {}
  for step in (1, 2):
    p = jax.tree.map(lambda x, s=step: np.asarray(x) + np.float32(s), params)
    orbax_io.save_params(str(workdir / "checkpoints"), step, p, tables, config)
    out[step] = p
  return out


def test_readers_fall_back_through_one_function(tmp_path, caplog):
  """director, export and init_from read through ``orbax_io.with_fallback``; none moves anything."""
  from unimage_jax.director import Director, DirectorError
  c = data_fixtures.tiny_config()
  c.model.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  workdir = tmp_path / "run"
  params = _two_step_checkpoint(workdir, c)
  shutil.copyfile(c.data.tokenizer_path, workdir / "tokenizer.model")
  meta = workdir / "checkpoints" / "2" / "params" / "_METADATA"
  good_meta = meta.read_bytes()
  meta.write_bytes(good_meta[:40])  # corrupt metadata of the newest step
  with caplog.at_level(logging.WARNING):
    director = Director.from_checkpoint(str(workdir))  # a workdir, resolved to its checkpoints folder
  assert director.step == 1 and "checkpoints/2 is unusable" in caplog.text
  np.testing.assert_array_equal(director.engine.params["lm_head"]["kernel"], params[1]["lm_head"]["kernel"])
  with pytest.raises(DirectorError, match=r"step 999 is not in .*checkpoints; its steps are \[1, 2\]"):
    Director.from_checkpoint(str(workdir), step=999)
  with pytest.raises(DirectorError, match=r"checkpoints/2 cannot be read"):
    Director.from_checkpoint(str(workdir), step=2)  # an explicit step is never replaced by another
  step, _ = export.export_checkpoint_step(str(workdir), str(tmp_path / "export"), dtype="float32")
  assert step == 1
  # init_from: a fresh state takes the step-1 params (the abstract state stands in for the new one)
  c.train.init_from = str(workdir)
  setup = setup_train(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  state = loop._init_from(setup.abstract, c, setup.shardings)
  np.testing.assert_array_equal(np.asarray(state.params["lm_head"]["kernel"]), params[1]["lm_head"]["kernel"])
  assert orbax_io.finished_steps(str(workdir / "checkpoints")) == [1, 2]  # readers never move a step
  # the CLI on a newest step with truncated arrays: a warning and step 1, with no traceback (Orbax's
  # metadata read left TensorStore opens running past its closed event loop, each printing
  # "RuntimeError: Event loop is closed")
  meta.write_bytes(good_meta)
  _truncate_data_files(workdir / "checkpoints" / "2" / "params")
  proc = run_tool("export_torch.py", f"--checkpoint={workdir}", f"--output={tmp_path}/cli_export", "--dtype=float32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoints/2 is unusable" in proc.stderr and "falling back to the previous one" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "of step 1 to" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------ exports
def test_a_failed_export_leaves_the_previous_one_and_no_partial_file(tmp_path):
  c = load_config(MICRO)
  workdir = tmp_path / "run"
  _two_step_checkpoint(workdir, c)
  out = tmp_path / "export"
  step, shards = export.export_checkpoint_step(str(workdir / "checkpoints"), str(out), dtype="float32",
                                               max_shard_bytes=100_000)
  assert step == 2 and len(shards) > 1
  good = _tree(out)
  for s in (1, 2):  # a step whose arrays fail half-way through the export
    _truncate_data_files(workdir / "checkpoints" / str(s) / "params")
  with pytest.raises(orbax_io.NoUsableCheckpointError):
    export.export_checkpoint_step(str(workdir), str(out), dtype="float32", max_shard_bytes=100_000)
  assert _tree(out) == good
  assert sorted(os.listdir(tmp_path)) == ["export", "run"]  # no temporary folder left behind
  with pytest.raises(orbax_io.CheckpointError, match="step 7 is not in"):
    export.export_checkpoint_step(str(workdir), str(out), step=7)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  with pytest.raises(export.OutputExistsError, match="holds no earlier export"):
    export.export_checkpoint_step(str(workdir), str(tmp_path / "notes"))


# ------------------------------------------------------------------------------ data
def test_storyboards_failed_reimport_keeps_the_previous_build(tmp_path):
  from data_pipelines import builders
  from data_pipelines.builders.user_import import BadRecordError, EmptyImportError
  from test_data_builders import _bad_lines, _good, _write_png
  images = tmp_path / "images"
  images.mkdir()
  _write_png(images / "a.png")
  _write_png(images / "b.png")
  path, data = tmp_path / "scripts.jsonl", tmp_path / "data"
  path.write_text(json.dumps(_good(0)) + "\n" + json.dumps(_good(1)) + "\n")
  builders.build_storyboards(str(data), str(path), str(images), 32)
  build = data / "storyboards"
  before = _tree(build)
  path.write_bytes(json.dumps(_good(0)).encode() + b"\n" + _bad_lines()["missing_image"][0] + b"\n")
  with pytest.raises(BadRecordError, match="scripts.jsonl:2"):
    builders.build_storyboards(str(data), str(path), str(images), 32)
  assert _tree(build) == before
  path.write_bytes(b"\n\n")
  with pytest.raises(EmptyImportError, match="holds no storyboard"):
    builders.build_storyboards(str(data), str(path), str(images), 32)
  bad = _bad_lines()
  path.write_bytes(bad["missing_image"][0] + b"\n" + bad["bad_json"][0] + b"\n" + bad["bad_json"][0] + b"\n")
  with pytest.raises(EmptyImportError) as e:
    builders.build_storyboards(str(data), str(path), str(images), 32, skip_bad_records=True)
  assert e.value.report.imported == 0 and dict(e.value.report.skipped) == {"bad_json": 2, "missing_image": 1}
  assert "skipped 3 bad records {'bad_json': 2, 'missing_image': 1}" in str(e.value)
  assert _tree(build) == before
  assert [n for n in os.listdir(data) if n.startswith(".")] == []  # scratch builds are removed
  assert len(builders.load_source(str(data), "storyboards")) == 2


def test_corrupt_dataset_files_name_the_path(tmp_path):
  from data_pipelines import builders
  builders.build_storyworld(str(tmp_path), num_stories=4, image_size=32, num_validation=1)
  version = pathlib.Path(builders.find_dataset_dir(str(tmp_path), "storyworld"))
  record_file = next(version.glob("storyworld-train.array_record-*"))
  raw = record_file.read_bytes()
  record_file.write_bytes(raw[: len(raw) // 2])  # truncated
  with pytest.raises(builders.DataError, match=re.escape(str(record_file))):
    builders.load_source(str(tmp_path), "storyworld", "train")
  record_file.write_bytes(b"not an array record")  # overwritten
  with pytest.raises(builders.DataError, match=re.escape(str(record_file)) + r" \(record 0\)"):
    builders.load_source(str(tmp_path), "storyworld", "train")
  (version / "dataset_info.json").write_text("{ not json")
  with pytest.raises(builders.DataError, match=re.escape(str(version)) + ": dataset_info.json"):
    builders.load_source(str(tmp_path), "storyworld", "validation")


def test_ambiguous_or_unfinished_builds_are_the_projects_errors(tmp_path, monkeypatch):
  """Several builds and no choice / a build without dataset_info.json: UserErrors (one line in a
  tool, not a traceback), still FileNotFoundErrors for callers that catch those."""
  from data_pipelines import builders
  from unimage_jax.errors import UserError
  data = tmp_path / "data"
  for name in ("a", "b"):  # two finished builds, as built_configs sees them
    (data / "storyboards" / name / "1.0.0").mkdir(parents=True)
    (data / "storyboards" / name / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(builders.AmbiguousDatasetError, match=r"config.data.dataset_config\), found \['a', 'b'\]") as e:
    builders.find_dataset_dir(str(data), "storyboards")
  assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
  (data / "storyboards" / "c").mkdir()  # a build that never finished (no version with dataset_info.json)
  monkeypatch.setattr(builders, "built_configs", lambda *_: ["c"])  # as if its version vanished between the two looks
  with pytest.raises(builders.DatasetNotBuiltError, match="c holds no finished build") as e:
    builders.find_dataset_dir(str(data), "storyboards")
  assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
  monkeypatch.undo()
  proc = run_tool("train_vae.py", "--config=configs/tiny_vae.py", f"--config.data.data_dir={data}",
                  "--config.data.dataset=storyboards", f"--output={tmp_path}/vae")
  assert_user_error(proc, "train_vae.py", "expected one built config of 'storyboards'", "found ['a', 'b']")
  assert not (tmp_path / "vae").exists()


def test_a_mistyped_tokenizer_path_is_an_error_not_a_new_tokenizer(tmp_path):
  from data_pipelines import pipeline
  c = data_fixtures.tiny_config()
  c.data.tokenizer_path = str(tmp_path / "tokenizr" / "spm.model")
  with pytest.raises(pipeline.MissingTokenizerError, match=r"config.data.tokenizer_path='.*tokenizr/spm.model'"):
    pipeline.ensure_dataset(c, verbose=False)
  assert not (tmp_path / "tokenizr").exists()
  # the default location next to data_dir is built on first use (data_fixtures relies on it)
  assert os.path.abspath(pipeline.default_tokenizer_path(data_fixtures.tiny_config())) == \
      os.path.abspath(data_fixtures.tiny_config().data.tokenizer_path)


def test_ensure_dataset_builds_the_configs_own_size_beside_another_build(tmp_path):
  """A data_dir holding another StoryWorld build gets this config's own build, not a silent read
  of the other one (another story count trains on other data)."""
  from data_pipelines import builders, pipeline
  c = data_fixtures.tiny_config()  # its tokenizer exists (the 120-story fixture's)
  c.data.data_dir = str(tmp_path / "data")
  builders.build_storyworld(c.data.data_dir, num_stories=3, image_size=32, seed=0, num_validation=1)
  c.data.num_stories = 5
  pipeline.ensure_dataset(c, verbose=False)
  assert builders.built_configs(c.data.data_dir, "storyworld") == ["n3_s32_seed0", "n5_s32_seed0"]
  wanted = pipeline.default_build_name(c)
  assert len(builders.load_source(c.data.data_dir, "storyworld", "train", prefer=wanted)) == 5
  assert len(builders.load_source(c.data.data_dir, "storyworld", "train", config_name="n3_s32_seed0")) == 3


# ------------------------------------------------------------------------------ the director's CLI
@pytest.fixture(scope="module")
def director_workdir(tmp_path_factory):
  c = data_fixtures.tiny_config()
  c.model.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  workdir = tmp_path_factory.mktemp("director") / "run"
  params, tables = functional.init_params(c.model, 0)
  orbax_io.save_params(str(workdir / "checkpoints"), 3, params, tables, c)
  shutil.copyfile(c.data.tokenizer_path, workdir / "tokenizer.model")
  return workdir


def test_direct_cli_checks_everything_before_generating(director_workdir, tmp_path):
  proc = run_tool("direct.py", f"--checkpoint={director_workdir}", "--prompt=A walk", "--step=999",
                  f"--output={tmp_path}/a")
  assert_user_error(proc, "direct.py", "step 999 is not in", "its steps are [3]")
  proc = run_tool("direct.py", f"--checkpoint={director_workdir}", "--prompt=A walk", f"--output={tmp_path}/b",
                  "--set=temperature=-1", "--set=cache_capacity=40")
  assert_user_error(proc, "direct.py", "--set=temperature=-1.0 must be >= 0", "--set=cache_capacity=40 cannot hold")
  (tmp_path / "file").write_text("x")
  proc = run_tool("direct.py", f"--checkpoint={director_workdir}", "--prompt=A walk", f"--output={tmp_path}/file")
  assert_user_error(proc, "direct.py", f"--output {tmp_path}/file", "is a file")
  proc = run_tool("direct.py", f"--checkpoint={director_workdir}", "--prompt=A walk", f"--output={tmp_path}/c",
                  f"--reference_images={tmp_path}/file,{tmp_path}/hero.png")
  assert_user_error(proc, "direct.py", "--reference_images", "file is not a readable image")
  assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing was created for the refused runs
