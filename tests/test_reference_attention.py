"""The reference attention's custom VJP equals plain autodiff of a dense softmax, chunked or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax import synthetic
from unimage_jax.attention.reference import reference_attention, visibility
from unimage_jax.layout import TokenMeta


def _dense(q, k, v, meta):
  b, l, hq, d = q.shape
  g = hq // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * d**-0.5
  mask = visibility(meta, meta)[:, None]
  s = jnp.where(mask, s, -1e30)
  p = jax.nn.softmax(s, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", p, vr)


@pytest.mark.parametrize("chunk", [1024, 16, 40])
def test_values_and_gradients_match_dense_autodiff(tiny_config, chunk):
  batch = synthetic.random_batch(tiny_config, seed=3)
  meta = TokenMeta(*(jnp.asarray(np.concatenate([batch[f"und_{n}"], batch[f"gen_{n}"]], 1))
                     for n in ("sample_ids", "segment_ids", "segment_kinds", "orders")))
  b, l = meta.orders.shape
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, l, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, l, 2, 8)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.normal(size=(b, l, 4, 8)), jnp.float32)
  ours = lambda q, k, v: jnp.sum(w * reference_attention(q, k, v, meta, query_chunk=chunk))
  dense = lambda q, k, v: jnp.sum(w * _dense(q, k, v, meta))
  np.testing.assert_allclose(ours(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-5)
  for a, b_ in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
  padding = np.asarray(meta.segment_kinds) == 0
  assert padding.any()
  np.testing.assert_array_equal(np.asarray(reference_attention(q, k, v, meta, query_chunk=chunk))[padding], 0.0)
