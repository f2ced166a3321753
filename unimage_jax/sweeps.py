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


def load_trials(path: str) -> list[dict[str, Any]]:
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  if isinstance(sweep, dict) and "grid" in sweep:
    keys = list(sweep["grid"])
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep["grid"][k] for k in keys))]
  if isinstance(sweep, (list, tuple)) and all(isinstance(t, dict) for t in sweep):
    return list(sweep)
  raise ValueError(f"{path}: get_sweep() must return a list of override dicts or {{'grid': {{...}}}}")


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
