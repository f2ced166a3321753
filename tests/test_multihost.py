"""Two local processes with jax.distributed (4 CPU devices each) match one 8-device process."""

import os
import pathlib
import socket
import subprocess
import sys

from unimage_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, devices, extra=()):
  return [sys.executable, "tools/train.py", "--config=tests/micro_config.py", f"--workdir={workdir}",
          "--config.train.steps=3", "--config.data.batch_size=8", "--config.mesh.data=-1",
          f"--cpu_devices_per_process={devices}", *extra]


def test_two_processes_match_one_process(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
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
