"""Measures the input pipeline: packed rows/s, stories/s and packing efficiency (no speed asserts).

Compares, in one run: packed vs one-sample-per-row (unpacked), and 0 vs N worker processes; with
--train_step (needs unimage_jax.training) it also times the tiny model's train step on the same
batches, so "is the pipeline the bottleneck" is answered on the same machine.

  python tools/bench_data.py --config=configs/tiny.py --num_batches=40 --workers=0,2 --train_step
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines import pipeline  # noqa: E402
from data_pipelines.sequence_plan import TASKS  # noqa: E402
from data_pipelines.throughput import bench  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 40, "Batches timed per setting (after 2 warm-up).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker-process counts to compare.")
_TASKS = flags.DEFINE_list("tasks", ["default", "mix"], "Task mixtures: default (config) | mix (interleaved + script + keyframe) | one task of "
                             "data_pipelines.sequence_plan.TASKS alone.")
_UNPACKED = flags.DEFINE_bool("unpacked", True, "Also time one sample per row (0 workers).")
_TRAIN_STEP = flags.DEFINE_bool("train_step", False, "Also time the model's train step (rows/s).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed train steps (after 2 warm-up).")


def _tasks(config, name: str):
  c = config.copy_and_resolve_references()
  if name == "mix":
    c.data.tasks.update({t: float(t in ("interleaved", "script", "keyframe")) for t in TASKS})
  elif name != "default":
    c.data.tasks.update({t: float(t == name) for t in TASKS})
  return c


def kept_fraction(config, num_samples: int = 600) -> float:
  """Share of planned tokens that reach a row (the rest are tails cut to fill rows)."""
  from data_pipelines.packing import FirstFitPacker
  from data_pipelines.sequence_plan import PlanConfig
  from unimage_jax import layout
  ds = pipeline.make_sample_dataset(config)
  lengths = [[layout.sample_lengths(v) for v in ds[i].variants] for i in range(num_samples)]
  d = config.data
  p = FirstFitPacker(PlanConfig.from_config(config).sizes, d.pack_open_rows, d.pack_max_age, min_keep=d.pack_min_keep)
  rows = []
  for i, variants in enumerate(lengths):
    rows += p.add(i, variants)
  rows += [b.members for b in p.bins]
  tok = lambda l: l[0] + l[1]
  return sum(tok(lengths[i][v]) for r in rows for i, v in r) / sum(tok(l[0]) for l in lengths)


def bench_train_step(config, num_steps: int) -> float | None:
  """Rows/s the tiny model's jitted train step consumes (None when the trainer is not present)."""
  try:
    import jax
    import jax.numpy as jnp
    from unimage_jax import sharding
    from unimage_jax.training import train_setup
  except ImportError as e:
    print(f"train step: not available here ({e})")
    return None
  setup = train_setup.setup_train(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state, step = setup.init_state(), setup.step
  it = iter(pipeline.make_dataset(config, process_index=0, process_count=1))
  batches = [jax.device_put({k: jnp.asarray(v) for k, v in next(it).items()}, setup.batch_shardings)
             for _ in range(num_steps + 2)]
  for b in batches[:2]:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for b in batches[2:]:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  return num_steps * config.data.batch_size / (time.perf_counter() - t0)


def main(argv):
  del argv
  config = _CONFIG.value
  pipeline.ensure_dataset(config)
  n = _NUM_BATCHES.value
  print(f"config: batch {config.data.batch_size} rows of und {config.data.und_len} + gen "
        f"{config.data.gen_len}; {os.cpu_count()} CPU cores; {n} batches per setting")
  print("| tasks | packing | workers | rows/s | stories/s | stories/row | efficiency | und fill | gen fill |")
  print("|---|---|---|---|---|---|---|---|---|")
  for task in _TASKS.value:
    c = _tasks(config, task)
    settings = [(True, int(w)) for w in _WORKERS.value] + ([(False, 0)] if _UNPACKED.value else [])
    for packed, workers in settings:
      c.data.num_workers = workers
      r = bench(c, packed, n)
      print(f"| {task} | {'first-fit' if packed else 'none'} | {workers} | {r['rows_per_s']:.1f} | "
            f"{r['samples_per_s']:.1f} | {r['samples_per_row']:.2f} | {r['efficiency']:.3f} | "
            f"{r['und_fill']:.3f} | {r['gen_fill']:.3f} |", flush=True)
    print(f"  ({task}: {kept_fraction(c):.3f} of planned und+gen tokens reach a row; the rest are cut tails)")
  if _TRAIN_STEP.value:
    rate = bench_train_step(config, _TRAIN_STEPS.value)
    if rate is not None:
      print(f"train step (tiny model, 1 CPU device, batch {config.data.batch_size}): {rate:.2f} rows/s")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
