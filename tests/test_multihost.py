"""Device splits of one run: two local processes with jax.distributed (4 CPU devices each) match one
8-device process; two CPU devices in one process (the main job) match one device."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from unimage_jax.interchange import orbax_io
from unimage_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, devices, extra=(), batch_size=8):
  return [sys.executable, "tools/train.py", "--config=tests/micro_config.py", f"--workdir={workdir}",
          "--config.train.steps=3", f"--config.data.batch_size={batch_size}", "--config.mesh.data=-1",
          f"--cpu_devices_per_process={devices}", *extra]


def _env() -> dict[str, str]:
  """The trainer's environment: CPU, this checkout, and no inherited device count."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return env


def test_two_processes_match_one_process(tmp_path):
  env = _env()
  single = tmp_path / "single"
  subprocess.run(_cmd(single, 8), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(_cmd(multi, 4, (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={i}")),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  a, b = read_metrics(str(single)), read_metrics(str(multi))
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
  for x, y in zip(a, b):
    for key in ("loss", "ce", "mse"):
      assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x, y)


def test_two_cpu_devices_split_the_rows_and_the_checkpoint_reads_anywhere(tmp_path):
  """The main job's ``--cpu_devices_per_process=2`` (one device per core): the batch's 2 rows split
  over the mesh's data axis give one device's losses, and the director's reader restores the
  two-device checkpoint in this process (another device count) with one device's params."""
  runs = {}
  for devices in (1, 2):
    workdir = tmp_path / f"devices{devices}"
    proc = subprocess.run(_cmd(workdir, devices, batch_size=2), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[devices] = workdir
  a, b = read_metrics(str(runs[1])), read_metrics(str(runs[2]))
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
  for x, y in zip(a, b):
    for key in ("loss", "ce", "mse", "grad_norm"):
      assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x, y)
  one, two = (orbax_io.load_checkpoint(str(runs[d]), None, use_ema=False) for d in (1, 2))
  assert one.step == two.step == 3
  for (path, p1), p2 in zip(jax.tree_util.tree_leaves_with_path(one.params), jax.tree_util.tree_leaves(two.params)):
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p2), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
