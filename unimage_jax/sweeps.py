"""Hyper-parameter sweeps: expand a sweep file into trials, run them, tabulate final metrics.

A sweep file defines ``get_sweep()`` returning either a list of override dicts
(``[{"optim.learning_rate": 1e-3}, ...]``) or ``{"grid": {key: [values...]}}`` for the Cartesian
product. Keys are config paths without the ``config.`` prefix.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import os
from typing import Any, Sequence

import ml_collections

from unimage_jax.errors import UserError


class SweepError(UserError, ValueError):
  """A sweep that cannot run: a bad sweep file, or trials whose overrides are invalid (all listed)."""


def load_trials(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path} does not exist (--sweep)")
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep()")
  sweep = module.get_sweep()
  if isinstance(sweep, dict) and "grid" in sweep:
    keys = list(sweep["grid"])
    trials = [dict(zip(keys, values)) for values in itertools.product(*(sweep["grid"][k] for k in keys))]
  elif isinstance(sweep, (list, tuple)) and all(isinstance(t, dict) for t in sweep):
    trials = list(sweep)
  else:
    raise SweepError(f"{path}: get_sweep() must return a list of override dicts or {{'grid': {{...}}}}")
  if not trials:
    raise SweepError(f"{path}: get_sweep() gives no trial")
  return trials


def trial_config(config_file: str, flag_args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config a trial's ``tools/train.py --config=<file> <flag_args>`` will see, parsed the same way
  (ml_collections' config flags on a private FlagValues)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train.py", f"--config={config_file}", *flag_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", flag_values=values, sys_argv=argv)
  values(argv, known_only=True)
  return values.config


def check_trials(config_file: str, base_overrides: Sequence[str], trials: Sequence[dict[str, Any]]) -> None:
  """Parses and validates every trial's config before any trial starts; one error lists every bad trial."""
  from unimage_jax.config_validation import ConfigError, validate_config
  from unimage_jax.errors import message_of, one_line
  problems = []
  for i, overrides in enumerate(trials):
    try:
      validate_config(trial_config(config_file, [*base_overrides, *override_flags(overrides)]))
    except ConfigError as e:
      problems.append(f"{trial_name(i, overrides)}: {one_line(e)}")
    except Exception as e:  # noqa: BLE001 - flag parsing: unknown field, wrong type, bad config file
      problems.append(f"{trial_name(i, overrides)}: bad override ({one_line(message_of(e))})")
  if problems:
    raise SweepError(f"{len(problems)} of {len(trials)} trials are invalid; no trial was started:\n  "
                     + "\n  ".join(problems))


def trial_name(index: int, overrides: dict[str, Any]) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  return f"trial{index:03d}_" + "_".join(parts).replace("/", "-")


def override_flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str, columns: Sequence[str]) -> tuple[str, str]:
  """Writes results.csv and results.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  csv_path, md_path = os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
      w.writerow({c: r.get(c, "") for c in columns})
  fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path
