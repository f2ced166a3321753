"""A data stream saved by 2 processes (gloo on CPU) resumes on 1: no sample is read twice."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import data_fixtures
import jax
import pytest

from data_pipelines import elastic, pipeline
from unimage_jax.training import loop
from unimage_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(root: str) -> list[str]:
  """The micro model on a small StoryWorld build (real Grain pipeline, packing, tokenizer)."""
  return [f"--config.data.data_dir={root}/data", f"--config.data.tokenizer_path={root}/tokenizer/spm.model",
          "--config.data.dataset=storyworld", "--config.data.num_stories=120", "--config.data.image_size=32",
          "--config.data.und_len=512", "--config.data.gen_len=256", "--config.data.vit_len=64",
          "--config.data.max_segments=64", "--config.model.vocab_size=1024", "--config.data.batch_size=2"]


def _config(root: str):
  """The trainer's config, built here from the same file and overrides."""
  from unimage_jax.config_loading import load_config
  c = load_config("tests/micro_config.py")
  for flag in _overrides(root):
    key, value = flag[len("--config."):].split("=", 1)
    section, field = key.split(".")
    old = c[section][field]
    c[section][field] = type(old)(value) if not isinstance(old, str) else value
  return c


def _train(workdir, root, steps, extra=()):
  return [sys.executable, "tools/train.py", "--config=tests/micro_config.py", f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", "--config.mesh.data=-1",
          "--cpu_devices_per_process=1", *_overrides(root), *extra]


def _emitted(state: dict) -> set[int]:
  """Global indices of the samples a saved process state has trained on (read, not buffered)."""
  packer = elastic.packer_state(state["stream"])
  buffered = {i for m in packer["ready"] + packer["open"] for i, _ in m}
  n, p, start = state["process_count"], state["process_index"], state["start"]
  return {start + p + j * n for j in range(packer["next"]) if j not in buffered}


def test_two_processes_save_one_resumes_without_repeating_a_sample(tmp_path):
  root = data_fixtures.built_dir(120)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  work = tmp_path / "run"
  port = _free_port()
  procs = [subprocess.Popen(_train(work, root, 2, (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                   f"--process_id={i}")),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=900)[0].decode(errors="replace") for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  saved = work / "checkpoints" / "2" / "data"
  assert sorted(n for n in os.listdir(saved) if n.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  before = elastic.load_states(str(saved))

  # the same command on one process continues the stream (and the run) from step 2
  resumed = subprocess.run(_train(work, root, 4), cwd=REPO, env=env, capture_output=True, timeout=900)
  log = resumed.stdout.decode(errors="replace") + resumed.stderr.decode(errors="replace")
  assert resumed.returncode == 0, log[-3000:]
  assert "data saved by 2 processes continues on 1" in log and "no sample is read twice" in log
  assert [m["step"] for m in read_metrics(str(work))] == [1, 2, 3, 4]
  after = elastic.load_states(str(work / "checkpoints" / "4" / "data"))
  assert list(after) == [0] and after[0]["process_count"] == 1

  # replayed here, the same pipeline reaches exactly the states the processes saved
  config = _config(root)
  for p in (0, 1):
    it = pipeline.make_train_iterator(config, process_index=p, process_count=2)
    next(it), next(it)
    assert json.loads(json.dumps(it.get_state())) == before[p]
  point = elastic.resume_point(before)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  it.resume_elastic(before)
  next(it), next(it)
  assert json.loads(json.dumps(it.get_state())) == after[0] and after[0]["start"] == point.start

  first = _emitted(before[0]) | _emitted(before[1])
  second = _emitted(after[0])
  assert first and second and not first & second  # no sample twice across the restart
  assert min(second) >= point.start > max(first)
  stream = pipeline.make_sample_dataset(config, process_index=0, process_count=1)  # the global sequence
  stories = lambda indices: [stream[g].story_id for g in sorted(indices)]
  assert not set(stories(first)) & set(stories(second))  # no story seen twice
  assert len(set(stories(first | second))) == len(first | second)  # all within the first epoch


def test_states_that_cannot_move_are_refused_with_how_to_restart():
  state = {"stream": {"anchor": 0, "next": 3, "ready": [], "open": [[[2, 0]]]}, "start": 0, "process_count": 2,
           "process_index": 0, "num_workers": 0}
  point = elastic.resume_point({0: state, 1: dict(state, process_index=1, stream=dict(state["stream"], next=5))})
  assert point.start == 1 + 5 * 2 and point.saved_processes == 2
  assert point.skipped == 2 + 3  # one buffered sample each, and process 0's unread indices 6, 8, 10
  with pytest.raises(elastic.ElasticResumeError, match="--config.train.data_resume=restart"):
    elastic.resume_point({0: dict(state, num_workers=2), 1: dict(state, process_index=1, num_workers=2)})
  with pytest.raises(elastic.ElasticResumeError, match="predates elastic resume.*data_resume=restart"):
    elastic.resume_point({0: state["stream"]})


def test_a_refused_data_state_resumes_with_data_resume_restart(tmp_path):
  """What the refusal tells the user to do: ``--config.train.data_resume=restart`` resumes the run
  (params, optimizer, step) and starts the data stream over."""
  config = _config(data_fixtures.built_dir(120))
  config.train.update(workdir=str(tmp_path), steps=4, checkpoint_every=2)
  devices = jax.devices()[:1]
  loop.train(config, devices=devices)
  ckpt = tmp_path / "checkpoints"
  data = ckpt / "4" / "data"
  (state,) = elastic.load_states(str(data)).values()
  # as if 2 processes with 2 Grain workers each had written step 4: cannot move to 1 process
  os.remove(data / "process_0-of-1.json")
  for p in (0, 1):
    (data / f"process_{p}-of-2.json").write_text(json.dumps(dict(state, process_index=p, process_count=2,
                                                                 num_workers=2)))
  config.train.steps = 5
  with pytest.raises(elastic.ElasticResumeError, match=r"worker processes.*--config\.train\.data_resume=restart"):
    loop.train(config, devices=devices)
  # a refusal, not an unreadable step: step 4 is neither replaced by step 2 nor moved aside
  assert sorted(p.name for p in ckpt.iterdir() if p.name[0].isdigit()) == ["2", "4"]
  assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4]

  config.train.data_resume = "restart"
  last = loop.train(config, devices=devices)
  assert last["step"] == 5 and [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  # the stream started over: the state saved at step 5 is that of a fresh stream after one batch
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(it)
  assert elastic.load_states(str(ckpt / "5" / "data"))[0] == json.loads(json.dumps(it.get_state()))
