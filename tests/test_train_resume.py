"""Exact resume after SIGKILL, corrupt-checkpoint fallback, restore onto other meshes, mesh refusal."""

import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unimage_jax import sharding
from unimage_jax.config_text import config_text
from unimage_jax.config_validation import ConfigError
from unimage_jax.training import checkpointing, loop
from unimage_jax.training.metrics import read_metrics
from unimage_jax.training.train_setup import setup_train

REPO = pathlib.Path(__file__).resolve().parent.parent


def _train_cmd(workdir, steps=8):
  return [sys.executable, "tools/train.py", "--config=tests/micro_config.py", f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.mesh.data=1"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return env


def _signal_after(cmd, metrics, lines, sig):
  """Runs ``cmd`` and sends ``sig`` once ``metrics`` has ``lines`` lines; returns the exit code."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  return proc.wait(timeout=120)


def test_sigkill_and_sigterm_resume_reproduce_losses_bitwise(tmp_path):
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  subprocess.run(_train_cmd(ref, steps=12), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
  kill_at = random.Random().randint(3, 5)
  code = _signal_after(_train_cmd(killed, steps=12), killed / "metrics.jsonl", kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, "the run finished before it could be killed"
  # the resumed run gets SIGTERM at its first new step: it saves at the next step boundary and exits
  # cleanly. "New" counts from the lines the killed run left (it may have logged a step or two
  # between the poll and the kill), so the signal never lands before the handler is installed
  written = len((killed / "metrics.jsonl").read_text().splitlines())
  code = _signal_after(_train_cmd(killed, steps=12), killed / "metrics.jsonl", written + 1, signal.SIGTERM)
  stopped = read_metrics(str(killed))[-1]["step"]
  assert code == 0 and stopped < 12, "the run finished before SIGTERM arrived"
  assert stopped in checkpointing.orbax_io.finished_steps(str(killed / "checkpoints"))
  subprocess.run(_train_cmd(killed, steps=12), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
  a = {m["step"]: (m["loss"], m["ce"], m["mse"]) for m in read_metrics(str(ref))}
  b = {m["step"]: (m["loss"], m["ce"], m["mse"]) for m in read_metrics(str(killed))}
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert a == b  # bitwise: same floats, same data order


def _train_in_process(config, workdir, devices, steps):
  config.train.update(workdir=str(workdir), steps=steps, checkpoint_every=2)
  return loop.train(config, devices=devices)


def test_corrupt_latest_checkpoint_is_moved_aside_recomputed_and_saved_again(tiny_config, tmp_path, caplog):
  first = _train_in_process(tiny_config, tmp_path, jax.devices()[:1], steps=4)
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4]
  # truncate every array chunk of the latest step's params (its metadata stays readable)
  for f in (ckpt_dir / "4" / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
  setup = setup_train(tiny_config, sharding.make_mesh(tiny_config.mesh, jax.devices()[:1]))
  ckpt = checkpointing.Checkpointer(str(ckpt_dir), tiny_config)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(setup.abstract, setup.shardings, None)
  ckpt.close()
  assert restored.step == 2
  assert f"checkpoint {ckpt_dir}/4 is unusable" in caplog.text
  assert (ckpt_dir / "4.corrupt").is_dir() and not (ckpt_dir / "4").exists()  # moved aside, not deleted
  assert f"moved the unreadable checkpoint {ckpt_dir}/4 to {ckpt_dir}/4.corrupt" in caplog.text
  # resuming the run recomputes steps 3-4 from the good checkpoint and saves step 4 again
  last = _train_in_process(tiny_config, tmp_path, jax.devices()[:1], steps=6)
  assert last["step"] == 6
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4, 6]
  step4 = {m["step"]: m["loss"] for m in read_metrics(str(tmp_path))}[4]
  assert step4 == first["loss"]  # the recomputed step is the same step
  caplog.clear()
  ckpt = checkpointing.Checkpointer(str(ckpt_dir), tiny_config)
  with caplog.at_level(logging.WARNING):
    again = ckpt._restore(4, setup.abstract, setup.shardings, None)
  ckpt.close()
  assert again.step == 4 and "unusable" not in caplog.text


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices")
def test_restore_onto_a_different_mesh(tiny_config, tmp_path):
  tiny_config.data.batch_size = 4
  tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
  _train_in_process(tiny_config, tmp_path, jax.devices()[:8], steps=2)
  results = []
  for n, mesh_cfg in ((8, dict(data=2, fsdp=2, tensor=2)), (1, dict(data=1, fsdp=1, tensor=1)),
                      (4, dict(data=1, fsdp=2, tensor=2)),
                      (8, dict(data=2, fsdp=1, tensor=1, sequence=4))):  # context parallelism: 4 shards per row
    tiny_config.mesh.update(**mesh_cfg)
    setup = setup_train(tiny_config, sharding.make_mesh(tiny_config.mesh, jax.devices()[:n]))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), tiny_config)
    restored = ckpt.restore_latest(setup.abstract, setup.shardings, None)
    ckpt.close()
    q = restored.state.params["decoder"]["layers"]["und"]["mlp"]["up_proj"]["kernel"]
    assert q.sharding.mesh.size == n
    assert q.sharding.mesh.shape["sequence"] == mesh_cfg.get("sequence", 1)
    results.append(jax.tree.map(np.asarray, (restored.state.params, restored.state.opt_state)))
  for other in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, results[0], other)


def test_mesh_mismatch_is_refused_before_compiling(tiny_config):
  tiny_config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match=r"has 3 devices but 1 are available"):
    sharding.make_mesh(tiny_config.mesh, jax.devices()[:1])
  if len(jax.devices()) >= 8:
    tiny_config.mesh.update(data=1, fsdp=1, tensor=8)
    mesh = sharding.make_mesh(tiny_config.mesh, jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"config.model.num_heads=4 is not divisible by config.mesh.tensor=8"):
      sharding.check_mesh_compatible(tiny_config, mesh)


def test_relative_workdir_checkpoints(tiny_config, tmp_path, monkeypatch):
  """The README's main job uses a relative workdir (runs/tiny); Orbax needs absolute paths. The
  workdir also records the effective config as ``tools/show_config.py`` prints it."""
  monkeypatch.chdir(tmp_path)
  tiny_config.train.update(workdir="runs/rel", steps=2, checkpoint_every=1)
  loop.train(tiny_config, devices=jax.devices()[:1])
  assert sorted(p.name for p in (tmp_path / "runs/rel/checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
  written = (tmp_path / "runs/rel/config.txt").read_text()
  assert written == config_text(tiny_config) and "train.workdir = 'runs/rel'\n" in written
