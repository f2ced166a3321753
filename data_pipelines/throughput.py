"""Pipeline throughput measurement shared by tools/bench_data.py and tools/benchmark.py."""

from __future__ import annotations

import time

import numpy as np

from data_pipelines import pipeline
from data_pipelines.packing import row_efficiency


def bench(config, packed: bool, num_batches: int) -> dict:
  it = iter(pipeline.make_dataset(config, process_index=0, process_count=1, packed=packed))
  for _ in range(2):
    next(it)
  t0 = time.perf_counter()
  effs, und, gen, samples, rows = [], [], [], 0, 0
  for _ in range(num_batches):
    b = next(it)
    effs.append(row_efficiency(b))
    und.append(np.mean(b["und_sample_ids"] >= 0))
    gen.append(np.mean(b["gen_sample_ids"] >= 0))
    samples += int(np.sum(b["und_sample_ids"].max(axis=1) + 1))
    rows += b["und_sample_ids"].shape[0]
  dt = time.perf_counter() - t0
  return {"rows_per_s": rows / dt, "samples_per_s": samples / dt, "samples_per_row": samples / rows,
          "efficiency": float(np.mean(effs)), "und_fill": float(np.mean(und)), "gen_fill": float(np.mean(gen))}
