"""One benchmark command: train step, attention kernel and data pipeline, each against its baseline.

  python tools/benchmark.py --config=configs/tiny.py --what=train,attention,data [--write]
* train:     tokens/s and MFU of the trainer's own compiled step (``unimage_jax/training/train_setup.py``: its
             shardings and donation) with the config's attention vs the XLA reference
* attention: fwd+bwd of the kernel (``--attention_impl``, default auto) vs the XLA reference on a
             StoryWorld-like packed row (on the CPU the kernel runs in interpret mode: that
             comparison is only meaningful on TPU/GPU)
* data:      packed rows/s and efficiency vs one sample per row (unpacked)
* torch:     the trainer's compiled step against an eager PyTorch forward+backward of the same model
             (``unimage_jax.torch_serving`` with autograd, same weights, same packed StoryWorld
             rows, same losses), both on this machine's CPU threads
``--write`` appends the tables to BENCHMARKS.md with the command, machine and date.
Timings are measured (medians of repeats); nothing here asserts speed.
"""

import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_WHAT = flags.DEFINE_list("what", ["train", "attention", "data"], "Benchmarks to run (train, attention, data, torch, torch_attention).")
_TORCH_ROWS = flags.DEFINE_list("torch_rows", ["1", "8"], "Packed rows per step in the torch comparison.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps per variant.")
_ATTN_LEN = flags.DEFINE_integer("attention_length", 2048, "Row length of the attention benchmark.")
_ATTN_IMPL = flags.DEFINE_string("attention_impl", "auto", "Kernel to compare with the reference.")
_BATCHES = flags.DEFINE_integer("data_batches", 20, "Batches timed per data variant.")
_WRITE = flags.DEFINE_bool("write", False, "Append the results to BENCHMARKS.md.")


def _median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _time_trainer_step(setup, batch) -> float:
  """Median seconds of the trainer's own compiled step (its shardings and donation: each call takes
  the state the previous one returned, as the training loop does)."""
  state = setup.init_state()
  batch = jax.device_put(batch, setup.batch_shardings)
  compiled = setup.compile(state)

  def step():
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics["loss"]

  return _median_time(step, _STEPS.value)


def bench_train(config) -> list[str]:
  from unimage_jax import sharding, synthetic
  from unimage_jax.attention.dispatch import resolve_impl
  from unimage_jax.training import metrics, train_setup
  rows = ["| attention | step s | tokens/s | MFU | vs reference |", "|---|---|---|---|---|"]
  mesh = sharding.make_mesh(config.mesh)
  batch = {k: jnp.asarray(v) for k, v in synthetic.random_batch(config).items()}
  throughput = metrics.Throughput.of(config, mesh)
  results = {}
  for impl in dict.fromkeys([resolve_impl(config.model.attention_impl), "xla"]):
    c = config.copy_and_resolve_references()
    c.model.attention_impl = impl
    seconds = _time_trainer_step(train_setup.setup_train(c, mesh), batch)
    results[impl] = seconds
    rates = throughput.rates(seconds)
    mfu = f"{rates['mfu']:.1%}" if "mfu" in rates else "n/a (no peak for this device)"
    rows.append(f"| {impl} | {seconds:.3f} | {rates['tokens_per_s']:,.0f} | {mfu} | {results['xla'] / seconds if 'xla' in results else float('nan'):.2f}x |")
  if len(results) > 1:  # fill the ratio of the first row now that the reference is known
    first = next(iter(results))
    rows[2] = rows[2].rsplit("|", 2)[0] + f"| {results['xla'] / results[first]:.2f}x |"
  return rows


def bench_attention(config) -> list[str]:
  from unimage_jax.attention import attention, reference_attention
  from unimage_jax.attention.dispatch import resolve_impl
  from unimage_jax.testing.layouts import storyworld_row_meta
  from unimage_jax.layout import TokenMeta
  m = config.model
  length = _ATTN_LEN.value
  meta, info = storyworld_row_meta(length, side=m.max_latent_grid if m.max_latent_grid < 16 else 16)
  meta = TokenMeta(*(jnp.asarray(x) for x in meta))
  rng = np.random.default_rng(0)
  dt = jnp.dtype(m.compute_dtype)
  q = jnp.asarray(rng.normal(size=(1, length, m.num_heads, m.head_dim)), dt)
  k = jnp.asarray(rng.normal(size=(1, length, m.num_kv_heads, m.head_dim)), dt)
  impl = resolve_impl(_ATTN_IMPL.value)
  rows = [f"StoryWorld-like row: L={length}, {info['stories']} stories, heads {m.num_heads}/{m.num_kv_heads}, "
          f"head_dim {m.head_dim}, {m.compute_dtype}", "", "| implementation | fwd+bwd ms | vs reference |", "|---|---|---|"]
  times = {}
  variants = [("xla reference", lambda q, k: reference_attention(q, k, k, meta))]
  if impl != "xla":  # on the CPU "auto" is the reference itself: nothing to compare
    variants.insert(0, (impl, lambda q, k: attention(q, k, k, meta, impl=impl)))
  for name, fn in variants:
    g = jax.jit(jax.grad(lambda q, k: jnp.sum(fn(q, k).astype(jnp.float32)), argnums=(0, 1)))
    times[name] = _median_time(lambda: g(q, k), 3)
  for name, t in times.items():
    rows.append(f"| {name} | {t * 1e3:.1f} | {times['xla reference'] / t:.2f}x |")
  return rows


def bench_data(config) -> list[str]:
  from data_pipelines import pipeline
  from data_pipelines.throughput import bench
  pipeline.ensure_dataset(config, verbose=False)
  rows = ["| packing | rows/s | stories/row | efficiency | vs unpacked rows/s |", "|---|---|---|---|---|"]
  res = {p: bench(config, p, _BATCHES.value) for p in (True, False)}
  for p, r in res.items():
    rows.append(f"| {'first-fit' if p else 'none'} | {r['rows_per_s']:.1f} | {r['samples_per_row']:.2f} | "
                f"{r['efficiency']:.3f} | {r['rows_per_s'] / res[False]['rows_per_s']:.2f}x |")
  return rows


def bench_torch(config) -> list[str]:
  import tempfile
  import torch
  from data_pipelines import pipeline
  from unimage_jax import losses, sharding
  from unimage_jax.interchange import export
  from unimage_jax.model import functional
  from unimage_jax.torch_serving import load_exported
  from unimage_jax.training import train_setup
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA's CPU client uses too
  pipeline.ensure_dataset(config, verbose=False)
  # the JAX step does more than the PyTorch one: it also applies AdamW, clipping and the EMA
  # with several CPU devices (JAX_NUM_CPU_DEVICES=2: one per core) the JAX step is also timed data
  # parallel over all of them, the rows split over the mesh's data axis, as tools/train.py runs it
  n_dev = jax.device_count()
  rows = ["| rows x (und + gen) | JAX devices | PyTorch eager fwd+bwd s | JAX jitted train step s | JAX / PyTorch time |",
          "|---|---|---|---|---|"]
  for n_rows in (int(r) for r in _TORCH_ROWS.value):
    c = config.copy_and_resolve_references()
    c.data.batch_size = n_rows
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.make_train_iterator(c, process_index=0, process_count=1)).items()}
    params, tables = functional.init_params(c.model, 0)
    with tempfile.TemporaryDirectory() as d:
      export.export_params(params, tables, c.model, d)
      tm = load_exported(d, device="cpu", dtype=torch.float32)
    tb = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    x_t, t, target, noised = losses.noise_latents(jax.random.key(0), batch, c.data.max_segments, c.model.timestep_shift)
    x_t, t, target, noised = (torch.as_tensor(np.asarray(a)) for a in (x_t, t, target, noised))
    labels = tb["und_labels"].long()

    def torch_step():  # the same losses as unimage_jax.losses (full logits: the tiny vocab allows it)
      logits, velocity = tm(tb, x_t, t)
      ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                                             reduction="none")
      ce = (ce * (labels.reshape(-1) >= 0)).sum() / (labels >= 0).sum()
      mse = (((velocity - target) ** 2).mean(-1) * noised).sum() / noised.sum()
      (ce + mse).backward()
      tm.zero_grad(set_to_none=True)

    torch_s = _median_time(lambda: torch_step() or jnp.zeros(()), _STEPS.value)
    for devices in dict.fromkeys([1] + ([n_dev] if n_rows % n_dev == 0 else [])):
      jax_s = _time_trainer_step(train_setup.setup_train(c, sharding.make_mesh(c.mesh, jax.devices()[:devices])), batch)
      rows.append(f"| {n_rows} x ({c.data.und_len} + {c.data.gen_len}) | {devices} | {torch_s:.3f} | {jax_s:.3f} | "
                  f"{jax_s / torch_s:.2f} |")
  return rows


def bench_torch_attention(config) -> list[str]:
  """The joint attention alone, forward + backward, on the metadata of the pipeline's first row:
  the model's CPU attention against the PyTorch serving module's (a dense mask and
  ``F.scaled_dot_product_attention``), the same random q, k and v."""
  import torch
  from data_pipelines import pipeline
  from unimage_jax.attention import attention
  from unimage_jax.attention.dispatch import resolve_impl
  from unimage_jax.model import row_shards
  from unimage_jax.torch_serving.model import meta_attention
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  pipeline.ensure_dataset(config, verbose=False)
  m = config.model
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  meta = row_shards.joint_meta(batch)
  b, length = meta[0].shape
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, length, m.num_heads, m.head_dim)).astype(np.float32)
  k, v = (rng.normal(size=(b, length, m.num_kv_heads, m.head_dim)).astype(np.float32) for _ in range(2))
  impl = resolve_impl(m.attention_impl)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, meta, impl=impl)), argnums=(0, 1, 2)))
  jax_s = _median_time(lambda: grad(q, k, v), _STEPS.value)
  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
  tmeta = tuple(torch.as_tensor(np.asarray(x)) for x in meta)

  def torch_step():
    meta_attention(tq, tk, tv, tmeta).sum().backward()
    for x in (tq, tk, tv):
      x.grad = None

  torch_s = _median_time(lambda: torch_step() or jnp.zeros(()), _STEPS.value)
  return ["| rows x length | heads (q / kv) x dim | PyTorch SDPA ms | JAX " + impl + " ms | JAX / PyTorch |",
          "|---|---|---|---|---|",
          f"| {b} x {length} | {m.num_heads} / {m.num_kv_heads} x {m.head_dim} | {torch_s * 1e3:.1f} | "
          f"{jax_s * 1e3:.1f} | {jax_s / torch_s:.2f} |"]


def main(argv):
  del argv
  config = _CONFIG.value
  device = jax.devices()[0]
  header = (f"`python {' '.join(sys.argv)}` on {device.device_kind} ({jax.device_count()} device(s), "
            f"{platform.machine()}), jax {jax.__version__}, {datetime.date.today()}")
  sections = []
  for what, fn in (("train", bench_train), ("attention", bench_attention), ("data", bench_data),
                   ("torch", bench_torch), ("torch_attention", bench_torch_attention)):
    if what in _WHAT.value:
      rows = fn(config)
      sections.append((what, rows))
      print(f"\n{what}:\n" + "\n".join(rows), flush=True)
  if _WRITE.value:
    with open("BENCHMARKS.md", "a") as f:
      f.write(f"\n## tools/benchmark.py run\n\n{header}\n")
      for what, rows in sections:
        f.write(f"\n{what}:\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
