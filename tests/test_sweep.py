"""A sweep over two learning rates produces its results table."""

import csv
import os
import pathlib
import subprocess
import sys

from tool_runs import assert_user_error, run_tool
from unimage_jax import sweeps

MICRO = "tests/micro_config.py"

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_grid_and_list_sweeps_expand(tmp_path):
  grid = tmp_path / "grid.py"
  grid.write_text("def get_sweep():\n  return {'grid': {'optim.learning_rate': [1, 2], 'train.seed': [0, 1, 2]}}\n")
  trials = sweeps.load_trials(str(grid))
  assert len(trials) == 6 and trials[0] == {"optim.learning_rate": 1, "train.seed": 0}
  listed = tmp_path / "list.py"
  listed.write_text("def get_sweep():\n  return [{'a.b': 1}, {'a.b': 2, 'c.d': 'x'}]\n")
  assert sweeps.load_trials(str(listed))[1] == {"a.b": 2, "c.d": "x"}


def test_two_learning_rate_sweep_writes_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "tools/sweep.py", "--config=tests/micro_config.py", "--sweep=sweeps/learning_rate.py",
       f"--workdir={tmp_path}", "--override=train.steps=2", "--parallel=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["optim.learning_rate"]) for r in rows] == [1e-3, 3e-3]
  assert all(r["status"] == "ok" and int(r["step"]) == 2 and float(r["loss"]) > 0 for r in rows)
  assert "| trial | optim.learning_rate |" in (tmp_path / "results.md").read_text()


def test_every_trial_is_checked_before_any_starts(tmp_path):
  """One impossible override fails the sweep at once, naming the trial; no trial runs."""
  sweep = tmp_path / "bad.py"
  sweep.write_text("def get_sweep():\n  return [{'optim.learning_rate': 1e-3}, {'optim.learning_rate': -1.0},"
                   " {'train.stepz': 3}]\n")
  out = run_tool("sweep.py", f"--config={MICRO}", f"--sweep={sweep}", f"--workdir={tmp_path}/sweep",
                 "--override=train.steps=2")
  assert_user_error(out, "sweep.py", "2 of 3 trials are invalid; no trial was started",
                    "trial001_learning_rate=-1.0: invalid config: config.optim.learning_rate=-1.0 must be positive",
                    "trial002_stepz=3: bad override", '"steps"')
  assert not (tmp_path / "sweep").exists()


def test_a_trial_that_fails_at_run_time_prints_its_error_line(tmp_path):
  """A trial that passes the up-front check but fails in train.py (an init_from folder that does not
  exist is only looked at when the trial starts): the sweep prints that trial's own error line,
  records its status and exits 1."""
  nowhere = tmp_path / "nowhere"
  sweep = tmp_path / "late.py"
  sweep.write_text(f"def get_sweep():\n  return [{{'train.init_from': {str(nowhere)!r}}}]\n")
  out = run_tool("sweep.py", f"--config={MICRO}", f"--sweep={sweep}", f"--workdir={tmp_path}/sweep",
                 "--override=train.steps=2")
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  name = sweeps.trial_name(0, {"train.init_from": str(nowhere)})
  failed = [line for line in out.stdout.splitlines() if line.startswith(f"[sweep] {name} failed (exit 2): ")]
  assert len(failed) == 1, out.stdout[-3000:]
  assert failed[0].endswith(f"train.py: error: config.train.init_from={str(nowhere)!r} holds no checkpoint steps "
                            "(the folder does not exist)"), failed[0]
  with open(tmp_path / "sweep" / "results.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["exit 2"]
  assert not (tmp_path / "sweep" / name).exists()  # refused before the trial wrote anything
