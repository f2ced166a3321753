"""Attention benchmarks: block-skip report (any machine) and kernel timings (GPU, e.g. H100).

  # block skipping on StoryWorld-like packed rows + work-scaling demo (CPU is fine)
  python tools/bench_attention.py --mode=skip

  # GPU: Pallas kernel vs jax.nn.dot_product_attention (cuDNN / XLA) vs the XLA reference,
  # forward and forward+backward, causal and interleaved masks; TFLOP/s count unmasked work only
  python tools/bench_attention.py --mode=gpu --lengths=4096,8192,16384

FLOPs: forward 4 * P * D * Hq where P is the number of visible (q, k) pairs; forward+backward
3.5x that (backward = 2.5x forward, the FlashAttention convention). Masked work is never counted,
so an implementation that computes the full square gains nothing from it.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

_MODE = flags.DEFINE_enum("mode", "skip", ["skip", "gpu"], "what to run")
_LENGTHS = flags.DEFINE_list("lengths", None, "sequence lengths (default per mode)")
_BLOCKS = flags.DEFINE_list("blocks", ["128", "256", "256x512", "512"],
                            "skip mode: tile sizes, N (square) or QxK")
_BATCH = flags.DEFINE_integer("batch", 1, "gpu mode: batch")
_HQ = flags.DEFINE_integer("q_heads", 28, "query heads")
_HKV = flags.DEFINE_integer("kv_heads", 4, "key/value heads")
_D = flags.DEFINE_integer("head_dim", 128, "head dim")
_BQ = flags.DEFINE_integer("block_q", 64, "gpu mode: kernel query block")
_BK = flags.DEFINE_integer("block_k", 64, "gpu mode: kernel key block")
_ITERS = flags.DEFINE_integer("iters", 10, "timed iterations (median reported)")
_SCALING = flags.DEFINE_bool("scaling", True, "skip mode: also time the work-scaling demo")


def _storyworld(length):
  """StoryWorld-like row; rows too short for a full story get miniature stories (smoke runs)."""
  from unimage_jax.testing import layouts
  try:
    return layouts.storyworld_row_meta(length)
  except ValueError:
    return layouts.storyworld_row_meta(length, shots=2, side=4, prompt=16, script=8)


def _causal_meta(length, sample_len=None, batch=1):
  """Text-only rows: samples of ``sample_len`` tokens (default one causal sample)."""
  import numpy as np
  from unimage_jax.layout import TokenMeta
  sample_len = sample_len or length
  i = np.arange(length)
  s = (i // sample_len).astype(np.int32)
  meta = TokenMeta(s, s, np.ones(length, np.int32), i.astype(np.int32))
  return TokenMeta(*(np.broadcast_to(x, (batch, length)).copy() for x in meta))


def skip_report():
  from unimage_jax.attention import block_summary as bs
  lengths = [int(x) for x in (_LENGTHS.value or ["8192", "16384", "32768"])]
  print("## Block skipping on StoryWorld-like packed rows")
  print()
  print("Row: whole stories (prompt 120 text tokens; 4 shots of 80-token script + noised 16x16 "
        "latent keyframe + its clean copy), und buffer then gen buffer, padding at each end.")
  print()
  print("Classes from the per-block summaries (what the kernels use); 'exact' columns are the "
        "ground truth from the dense visibility (tiles with no visible pair / all pairs visible).")
  print()
  print("| L | stories | masked pairs | tile | tiles | skipped (EMPTY) | PARTIAL | FULL | "
        "exact empty | exact full |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for length in lengths:
    meta, info = _storyworld(length)
    masked = 1.0 - bs.visible_fraction(meta)
    for spec in _BLOCKS.value:
      bq, bk = (int(x) for x in (spec.split("x") if "x" in spec else (spec, spec)))
      f = bs.skipped_fraction(bs.classify_meta(meta, meta, bq, bk))
      x = bs.skipped_fraction(bs.exact_tile_classes(meta, meta, bq, bk))
      print(f"| {length} | {info['stories']} | {masked:.3f} | {bq}x{bk} | {f['tiles']} | "
            f"{f['skipped']:.3f} | {f['partial']:.3f} | {f['full']:.3f} | {x['skipped']:.3f} | "
            f"{x['full']:.3f} |", flush=True)
  if _SCALING.value:
    scaling_demo()


def scaling_demo():
  """Work follows the unmasked fraction: rows of ever shorter causal samples (and a StoryWorld
  row) at a fixed L. The kernels' work is exactly the number of non-empty tiles in their block
  lists (the trip count of the GPU kernel's loop, the enabled grid steps of the TPU kernel), so
  that is reported everywhere; on a GPU the forward is also timed (on the CPU, interpret-mode
  timings are dominated by interpreter overhead and machine noise and are not reported)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from unimage_jax.attention import block_summary as bs
  from unimage_jax.attention import pallas_gpu
  from unimage_jax.layout import TokenMeta

  on_gpu = jax.default_backend() == "gpu"
  length = 16384 if on_gpu else 4096
  block, hq, hkv, d = 128, _HQ.value, _HKV.value, _D.value
  rows = [(f"causal, samples of {s}", _causal_meta(length, s))
          for s in (length, length // 2, length // 4, length // 8, length // 16, length // 32)]
  sw, _ = _storyworld(length)
  rows.append(("StoryWorld-like packed row", sw))
  print()
  print(f"## Work scales with the unmasked fraction (L={length}, tile {block}x{block})")
  print()
  header = "| row | visible pairs | computed tiles | computed tiles / causal |"
  if on_gpu:
    header += f" pallas_gpu fwd ms ({hq}/{hkv} heads, D={d}) | ms / causal |"
  print(header)
  print("|---|---|---|---|" + ("---|---|" if on_gpu else ""))
  base_tiles = base_ms = None
  if on_gpu:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, length, hq, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, length, hkv, d)), jnp.bfloat16) for _ in range(2))
    fn = jax.jit(functools.partial(pallas_gpu.flash_attention, block_q=block, block_k=block))
  for name, meta in rows:
    meta = TokenMeta(*(jnp.asarray(x) for x in meta))
    vis = bs.visible_fraction(meta)
    tiles = int(np.sum(np.asarray(bs.classify_meta(meta, meta, block, block)) != bs.EMPTY))
    base_tiles = base_tiles or tiles
    line = f"| {name} | {vis:.4f} | {tiles} | {tiles / base_tiles:.3f} |"
    if on_gpu:
      ms = 1e3 * _time(fn, q, k, v, meta)
      base_ms = base_ms or ms
      line += f" {ms:.2f} | {ms / base_ms:.3f} |"
    print(line, flush=True)


def _time(fn, *args):
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_ITERS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _value_and_grads(f, q, k, v):
  import jax
  import jax.numpy as jnp
  out = jax.jit(f)(q, k, v)
  w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w),
                           (0, 1, 2)))(q, k, v)
  return out, grads


def gpu_bench():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from unimage_jax.attention import attention, block_summary as bs, reference_attention
  from unimage_jax.attention.reference import visibility
  from unimage_jax.layout import TokenMeta

  print(f"devices: {jax.devices()}")
  lengths = [int(x) for x in (_LENGTHS.value or ["4096", "8192", "16384"])]
  b, hq, hkv, d = _BATCH.value, _HQ.value, _HKV.value, _D.value
  print(f"batch {b}, heads {hq}/{hkv}, head_dim {d}, bf16, kernel blocks "
        f"{_BQ.value}x{_BK.value}; TFLOP/s over unmasked work; median of {_ITERS.value}")
  print()
  print("| mask | L | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  checks = []
  for length in lengths:
    sw, _ = _storyworld(length)
    for mask_name, meta_np in (("causal", _causal_meta(length, batch=b)),
                               ("interleaved", TokenMeta(*(np.repeat(x, b, 0) for x in sw)))):
      meta = TokenMeta(*(jnp.asarray(x) for x in meta_np))
      pairs = bs.visible_fraction(meta) * b * length * length
      fwd_flops = 4.0 * pairs * d * hq
      q = jnp.asarray(rng.normal(size=(b, length, hq, d)), jnp.bfloat16)
      k, v = (jnp.asarray(rng.normal(size=(b, length, hkv, d)), jnp.bfloat16) for _ in range(2))

      def dense_mask():  # [B, 1, L, L]: what the generic APIs need for this mask
        return jax.jit(lambda m: visibility(m, m)[:, None])(meta)

      impls = {
          "pallas_gpu": lambda q, k, v: attention(q, k, v, meta, impl="pallas_gpu",
                                                  block_q=_BQ.value, block_k=_BK.value),
          "xla_reference": lambda q, k, v: reference_attention(q, k, v, meta),
      }
      if mask_name == "causal":
        for name in ("cudnn", "xla"):
          impls[f"dot_product_attention[{name}]"] = functools.partial(
              jax.nn.dot_product_attention, is_causal=True, implementation=name)
      else:
        mask = dense_mask()
        for name in ("cudnn", "xla"):
          impls[f"dot_product_attention[{name}, dense mask]"] = functools.partial(
              jax.nn.dot_product_attention, mask=mask, implementation=name)
      # correctness on the device first: kernel vs reference, output and gradients (bf16)
      ref_o, ref_g = _value_and_grads(impls["xla_reference"], q, k, v)
      ker_o, ker_g = _value_and_grads(impls["pallas_gpu"], q, k, v)
      err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip((ker_o, *ker_g), (ref_o, *ref_g)))
      checks.append(f"{mask_name} L={length}: max |pallas_gpu - reference| over o, dq, dk, dv "
                    f"= {err:.3g}")
      for name, f in impls.items():
        row = [mask_name, str(length), name]
        try:
          fwd = jax.jit(f)
          t = _time(fwd, q, k, v)
          row += [f"{1e3 * t:.2f}", f"{fwd_flops / t / 1e12:.1f}"]
        except Exception as e:  # unsupported configuration or OOM: say so, keep going
          row += [f"failed: {type(e).__name__}", ""]
        try:
          grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                  (0, 1, 2)))
          t = _time(grad, q, k, v)
          row += [f"{1e3 * t:.2f}", f"{3.5 * fwd_flops / t / 1e12:.1f}"]
        except Exception as e:
          row += [f"failed: {type(e).__name__}", ""]
        print("| " + " | ".join(row) + " |", flush=True)
  print()
  for line in checks:
    print(line)


def main(argv):
  del argv
  if _MODE.value == "skip":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    skip_report()
  else:
    gpu_bench()
    scaling_demo()


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
