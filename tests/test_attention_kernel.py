"""Pallas kernels (interpret mode on CPU) against the XLA reference: outputs and dq, dk, dv.

Shapes are fixed per test so jit compiles once; hypothesis varies the packed layouts (several
samples per row, text / ViT / clean / noised segments, padding, optionally shuffled slots), which
are data. L = 100 and 77 are not multiples of the blocks (16 / 32), so the wrappers' padding is
covered.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from unimage_jax.attention import attention, reference_attention
from unimage_jax.attention.dispatch import resolve_impl
from unimage_jax.layout import TokenMeta
from unimage_jax.testing import layouts

B, LU, LG, D = 2, 60, 40, 16  # L = 100
TOL = 2e-5


@functools.lru_cache(maxsize=None)
def _fwd_and_grads(impl: str, block_q: int, block_k: int):
  def run(q, k, v, meta, w):
    if impl == "ref":
      f = lambda q, k, v: reference_attention(q, k, v, meta)
    else:
      f = lambda q, k, v: attention(q, k, v, meta, impl=impl, block_q=block_q, block_k=block_k,
                                    interpret=True)
    loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
    return f(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)

  return jax.jit(run)


def _inputs(seed: int, hq: int, hkv: int, shuffle: bool, dtype=jnp.float32, lu=LU, lg=LG):
  rng = np.random.default_rng(seed)
  meta = layouts.random_batch_meta(rng, B, lu, lg, shuffle=shuffle)
  l = lu + lg
  q, k, v, w = (jnp.asarray(rng.normal(size=s), dtype) for s in
                ((B, l, hq, D), (B, l, hkv, D), (B, l, hkv, D), (B, l, hq, D)))
  return q, k, v, TokenMeta(*(jnp.asarray(x) for x in meta)), w


def _compare(impl, seed, hq, hkv, shuffle, block_q=16, block_k=32, **sizes):
  args = _inputs(seed, hq, hkv, shuffle, **sizes)
  out, grads = _fwd_and_grads(impl, block_q, block_k)(*args)
  ref_out, ref_grads = _fwd_and_grads("ref", 0, 0)(*args)
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
  for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(g, rg, atol=TOL, rtol=0, err_msg=name)


@pytest.fixture
def tpu_pipeline(request, monkeypatch):
  """Selects the TPU kernel's pipeline for one test (fresh jit cache on both sides)."""
  from unimage_jax.attention import pallas_tpu
  monkeypatch.setattr(pallas_tpu, "DEFAULT_PIPELINE", request.param)
  _fwd_and_grads.cache_clear()
  yield request.param
  _fwd_and_grads.cache_clear()


# The default "dma" pipeline runs under the TPU interpreter (simulated DMAs and semaphores),
# which is slow on the CPU, so it gets fewer examples; the "grid" pipeline shares the math and
# the tile lists and is cheap to interpret, so it covers more layouts and tilings.
@pytest.mark.parametrize("tpu_pipeline", ["dma"], indirect=True)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1)])
@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans())
def test_tpu_kernel_matches_reference(tpu_pipeline, hq, hkv, seed, shuffle):
  _compare("pallas_tpu", seed, hq, hkv, shuffle)


@pytest.mark.parametrize("tpu_pipeline", ["grid"], indirect=True)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1)])
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans(),
       blocks=st.sampled_from([(16, 32), (32, 16), (16, 16)]),
       sizes=st.sampled_from([(60, 40), (45, 32)]))  # L = 100, 77
def test_tpu_grid_pipeline_matches_reference(tpu_pipeline, hq, hkv, seed, shuffle, blocks,
                                             sizes):
  _compare("pallas_tpu", seed, hq, hkv, shuffle, *blocks, lu=sizes[0], lg=sizes[1])


@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1)])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans(),
       blocks=st.sampled_from([(16, 32), (32, 16)]))
def test_gpu_kernel_matches_reference(hq, hkv, seed, shuffle, blocks):
  _compare("pallas_gpu", seed, hq, hkv, shuffle, *blocks)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1)])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans(),
       blocks=st.sampled_from([(16, 32), (32, 16), (16, 16)]),
       sizes=st.sampled_from([(60, 40), (45, 32)]))  # L = 100, 77
def test_blocked_xla_matches_reference(hq, hkv, seed, shuffle, blocks, sizes):
  """The CPU fast path (flash-style XLA with EMPTY tiles skipped by lax.cond)."""
  _compare("xla_flash", seed, hq, hkv, shuffle, *blocks, lu=sizes[0], lg=sizes[1])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "xla_flash"])
def test_square_blocks_and_exact_multiple(impl):
  """Other tilings: block_q > block_k, and a length that is an exact multiple of the tiles."""
  _compare(impl, 3, 4, 2, False, block_q=32, block_k=16, lu=80, lg=48)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "xla_flash"])
def test_all_padding_row_is_zero(impl):
  q, k, v, meta, w = _inputs(0, 2, 1, False)
  meta = TokenMeta(*(x.at[1].set(0 if i != 0 else -1) for i, x in enumerate(meta)))
  out, grads = _fwd_and_grads(impl, 16, 32)(q, k, v, meta, w)
  assert np.all(np.asarray(out[1]) == 0)
  for g in grads:
    assert np.all(np.asarray(g[1]) == 0)
  assert np.all(np.isfinite(np.asarray(out)))


def test_bf16_close_to_reference():
  q, k, v, meta, w = _inputs(5, 4, 2, False, dtype=jnp.bfloat16)
  out = attention(q, k, v, meta, impl="pallas_tpu", block_q=16, block_k=32, interpret=True)
  ref = reference_attention(q, k, v, meta)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=0)


def test_dispatch():
  assert resolve_impl("auto", "cpu") == "xla_flash"
  assert resolve_impl("auto", "tpu") == "pallas_tpu"
  assert resolve_impl("auto", "gpu") == "pallas_gpu"
  with pytest.raises(ValueError):
    resolve_impl("cudnn")
  q, k, v, meta, _ = _inputs(1, 2, 2, False)
  np.testing.assert_array_equal(attention(q, k, v, meta, impl="xla"), reference_attention(q, k, v, meta))
  np.testing.assert_allclose(attention(q, k, v, meta, impl="auto"), reference_attention(q, k, v, meta), atol=2e-6)


_SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from unimage_jax.attention import pallas_tpu, reference_attention
from unimage_jax.attention.sharded import sharded_attention
pallas_tpu.DEFAULT_PIPELINE = "grid"  # the TPU interpreter's DMA simulation is slow on 8 devices
from unimage_jax.layout import TokenMeta
from unimage_jax.testing import layouts
mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
rng = np.random.default_rng(0)
meta = TokenMeta(*(jnp.asarray(x) for x in layouts.random_batch_meta(rng, 4, 40, 24)))
q = jnp.asarray(rng.normal(size=(4, 64, 8, 16)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(4, 64, 2, 16)), jnp.float32) for _ in range(2))
def loss(f):
  return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
ker = lambda q, k, v: sharded_attention(q, k, v, meta, mesh=mesh, impl="pallas_tpu",
                                        block_q=16, block_k=16, interpret=True)
ref = lambda q, k, v: reference_attention(q, k, v, meta)
out = jax.jit(ker)(q, k, v)
np.testing.assert_allclose(out, ref(q, k, v), atol=2e-5, rtol=0)
g1 = jax.jit(jax.grad(loss(ker), (0, 1, 2)))(q, k, v)
g2 = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
for a, b in zip(g1, g2):
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
print("SHARDED_OK")
"""


def test_sharded_wrapper_on_cpu_mesh():
  """shard_map over a (data=2, fsdp=1, tensor=4) CPU mesh; Hkv=2 < tensor=4 takes the KV repeat
  path. Runs in a subprocess to get 8 host devices."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
  res = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                       env=env, timeout=600)
  assert "SHARDED_OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_default_blocks_single_tile(impl):
  """Default (large) blocks on a short row: one tile covering the padded row."""
  q, k, v, meta, w = _inputs(11, 4, 2, True)
  out, grads = _fwd_and_grads(impl, None, None)(q, k, v, meta, w)
  ref_out, ref_grads = _fwd_and_grads("ref", 0, 0)(q, k, v, meta, w)
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, rg, atol=TOL, rtol=0)


def test_bf16_gradients_close_to_reference():
  q, k, v, meta, w = _inputs(6, 7, 1, False, dtype=jnp.bfloat16)
  grads = _fwd_and_grads("pallas_tpu", 16, 32)(q, k, v, meta, w)[1]
  ref = _fwd_and_grads("ref", 0, 0)(q, k, v, meta, w)[1]
  for g, rg in zip(grads, ref):
    assert g.dtype == jnp.bfloat16
    scale = float(np.max(np.abs(np.asarray(rg, np.float32)))) + 1e-6
    err = float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(rg, np.float32))))
    assert err <= 3e-2 * scale, (err, scale)


@pytest.mark.parametrize("impl,pipeline", [("pallas_tpu", "dma"), ("pallas_tpu", "grid"),
                                           ("pallas_gpu", None)])
def test_skipped_blocks_are_never_read(impl, pipeline, monkeypatch):
  """Block skipping is real: NaN-poison q/k/v in every block that the tile lists skip for a
  row (key blocks EMPTY for all query blocks, query blocks EMPTY for all key blocks). Any load
  of such a block into a matmul would turn outputs or gradients into NaN (0 * NaN = NaN)."""
  from unimage_jax.attention import block_summary as bs
  from unimage_jax.attention import pallas_tpu
  if pipeline:
    monkeypatch.setattr(pallas_tpu, "DEFAULT_PIPELINE", pipeline)
  _fwd_and_grads.cache_clear()
  rng = np.random.default_rng(7)
  lu, lg, blk = 64, 64, 16
  meta = layouts.random_batch_meta(rng, B, lu, lg, max_samples=2)
  classes = np.asarray(bs.classify_meta(meta, meta, blk, blk))  # L = 128: no wrapper padding
  dead_k = np.all(classes == bs.EMPTY, axis=1).repeat(blk, axis=-1)  # [B, L]
  dead_q = np.all(classes == bs.EMPTY, axis=2).repeat(blk, axis=-1)
  assert dead_k.any() and dead_q.any(), "layout without skippable blocks"
  q, k, v, _, w = _inputs(7, 4, 2, False, lu=lu, lg=lg)
  meta = TokenMeta(*(jnp.asarray(x) for x in meta))
  nan = jnp.float32(jnp.nan)
  poison = lambda x, dead: jnp.where(jnp.asarray(dead)[:, :, None, None], nan, x)
  try:
    out, grads = _fwd_and_grads(impl, blk, blk)(poison(q, dead_q), poison(k, dead_k),
                                                 poison(v, dead_k), meta, w)
  finally:
    _fwd_and_grads.cache_clear()
  ref_out, ref_grads = _fwd_and_grads("ref", 0, 0)(q, k, v, meta, w)
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, rg, atol=TOL, rtol=0)


@pytest.mark.parametrize("hq,budget", [(4, 60_000), (7, 1)])
def test_tpu_group_chunks(hq, budget, monkeypatch):
  """The "dma" forward/dQ kernels split a GQA group into chunks when VMEM is short (here
  forced: 4 heads -> 2 chunks of 2, 7 heads -> 7 chunks of 1)."""
  from unimage_jax.attention import pallas_tpu
  monkeypatch.setattr(pallas_tpu, "VMEM_BUDGET", budget)
  monkeypatch.setattr(pallas_tpu, "DEFAULT_PIPELINE", "dma")
  assert pallas_tpu._group_chunk(hq, 16, 32, D, 4) == (2 if hq == 4 else 1)
  _fwd_and_grads.cache_clear()
  try:
    _compare("pallas_tpu", 31, hq, 1, True)
  finally:
    _fwd_and_grads.cache_clear()
