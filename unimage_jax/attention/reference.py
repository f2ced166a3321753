"""Pure-XLA reference attention for the generalized causal (MoT) mask.

This is the oracle every kernel is tested against and the fallback on any backend. The mask is
never stored as an L x L array: queries are processed in chunks of ``query_chunk`` rows (a
``lax.map`` under ``jax.checkpoint``), so the live score tile is ``[B, H, chunk, Lk]`` in the
forward pass and is recomputed, not saved, for the backward pass. With ``Lq <= query_chunk`` it is
a single dense tile, which is what the tests compare bit-for-bit against hand-written masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unimage_jax import layout
from unimage_jax.layout import TokenMeta


def visibility(q_meta: TokenMeta, k_meta: TokenMeta) -> jax.Array:
  """Boolean ``[..., Lq, Lk]`` visibility from per-token metadata (``[..., Lq]``, ``[..., Lk]``)."""
  qs, qg, qk, qo = (x[..., :, None] for x in q_meta)
  ks, kg, kk, ko = (x[..., None, :] for x in k_meta)
  k_full = (kk == layout.KIND_VIT) | (kk == layout.KIND_CLEAN) | (kk == layout.KIND_NOISE)
  same_segment = qg == kg
  allowed = (qk != layout.KIND_PAD) & (kk != layout.KIND_PAD) & (qs == ks)
  allowed &= (ko <= qo) | (same_segment & k_full)
  allowed &= ~((kk == layout.KIND_NOISE) & ~same_segment)
  return allowed


def _attend_chunk(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
  """One dense tile. q [B, Lq, Hkv, G, D]; k, v [B, Lk, Hkv, D] -> [B, Lq, Hkv, G, D]."""
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = visibility(q_meta, k_meta)[:, None, None]  # [B, 1, 1, Lq, Lk]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max)  # masked entries are exp(-inf) = 0
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom > 0, denom, 1.0)  # fully masked rows (padding) give zeros
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out


def reference_attention(
    q: jax.Array,  # [B, Lq, Hq, D]
    k: jax.Array,  # [B, Lk, Hkv, D]
    v: jax.Array,  # [B, Lk, Hkv, D]
    q_meta: TokenMeta,  # fields [B, Lq]
    k_meta: TokenMeta | None = None,  # fields [B, Lk]; defaults to q_meta (self-attention)
    *,
    scale: float | None = None,
    query_chunk: int = 1024,
) -> jax.Array:  # [B, Lq, Hq, D]
  """Softmax attention restricted by :func:`visibility`; GQA when ``Hq`` is a multiple of ``Hkv``.

  Queries that see no key (padding) get a zero output. Softmax runs in fp32; the output has
  ``q.dtype``.
  """
  k_meta = q_meta if k_meta is None else k_meta
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
  scale = d**-0.5 if scale is None else scale
  qg = q.reshape(b, lq, hkv, hq // hkv, d)  # [B, Lq, Hkv, G, D]
  if lq <= query_chunk:
    out = _attend_chunk(qg, k, v, q_meta, k_meta, scale)
    return out.reshape(b, lq, hq, d).astype(q.dtype)

  n_chunks = -(-lq // query_chunk)
  pad = n_chunks * query_chunk - lq
  pad_meta = lambda x, fill: jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
  q_pad = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  meta_pad = TokenMeta(*(pad_meta(x, 0) for x in q_meta))  # kind 0 = padding
  chunk = lambda x: jnp.moveaxis(x.reshape(b, n_chunks, query_chunk, *x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(args):
    q_c, meta_c = args
    return _attend_chunk(q_c, k, v, TokenMeta(*meta_c), k_meta, scale)

  out = jax.lax.map(body, (chunk(q_pad), tuple(chunk(x) for x in meta_pad)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * query_chunk, hq, d)[:, :lq]
  return out.astype(q.dtype)
