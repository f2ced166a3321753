"""Runs a hyper-parameter sweep: one tools/train.py process per trial, then a results table.

  python tools/sweep.py --config=configs/tiny.py --sweep=sweeps/learning_rate.py --workdir=runs/sweep_lr
"""

import os
import subprocess
import sys

from absl import flags

from unimage_jax import cli, sweeps
from unimage_jax.training.metrics import read_metrics

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Base config file.")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().", required=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Directory for trials and the results table.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra --config.* overrides for every trial, "
                                       "e.g. --override=train.steps=50.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at once (one process each).")

METRICS = ("loss", "ce", "mse", "tokens_per_s")


def _last_error(log_path: str) -> str:
  """The line of a failed trial's log that says why (``train.py: error: ...`` or a traceback's last line)."""
  with open(log_path, errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if ": error: " in line]
  return (errors or lines or ["(empty log)"])[-1]


def main(argv):
  del argv
  trials = sweeps.load_trials(_SWEEP.value)
  base = [f"--config.{o}" for o in _OVERRIDES.value]
  sweeps.check_trials(_CONFIG.value, base, trials)  # every trial's overrides, before any trial starts
  os.makedirs(_WORKDIR.value, exist_ok=True)
  pending, rows = list(enumerate(trials)), []
  running = []
  while pending or running:
    while pending and len(running) < _PARALLEL.value:
      i, overrides = pending.pop(0)
      name = sweeps.trial_name(i, overrides)
      workdir = os.path.join(_WORKDIR.value, name)
      cmd = [sys.executable, "tools/train.py", f"--config={_CONFIG.value}", f"--workdir={workdir}", *base,
             *sweeps.override_flags(overrides)]
      print(f"[sweep] {name}: {' '.join(cmd[2:])}", flush=True)
      log = open(os.path.join(_WORKDIR.value, f"{name}.log"), "w")
      running.append((i, name, overrides, workdir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    i, name, overrides, workdir, proc, log = running.pop(0)
    code = proc.wait()
    log.close()
    row = {"trial": name, **{k: v for k, v in overrides.items()}, "status": "ok" if code == 0 else f"exit {code}"}
    if code != 0:  # the reason, not only "see its log"
      print(f"[sweep] {name} failed (exit {code}): {_last_error(os.path.join(_WORKDIR.value, f'{name}.log'))}",
            flush=True)
    if code == 0:
      last = read_metrics(workdir)[-1]
      row.update(step=last["step"], **{m: last.get(m, "") for m in METRICS})
    rows.append(row)
  keys = list(dict.fromkeys(k for t in trials for k in t))
  csv_path, md_path = sweeps.write_tables(sorted(rows, key=lambda r: r["trial"]), _WORKDIR.value,
                                          ["trial", *keys, "status", "step", *METRICS])
  print(open(md_path).read())
  print(f"[sweep] wrote {csv_path} and {md_path}")
  if any(r["status"] != "ok" for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
