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
  """Boolean ``[..., Lq, Lk]`` visibility (:func:`layout.visible`) from per-token metadata
  (``[..., Lq]``, ``[..., Lk]``)."""
  return layout.visible(TokenMeta(*(x[..., :, None] for x in q_meta)),
                        TokenMeta(*(x[..., None, :] for x in k_meta)))


def checked_defaults(q: jax.Array, k: jax.Array, q_meta: TokenMeta, k_meta: TokenMeta | None,
                     scale: float | None) -> tuple[TokenMeta, float]:
  """What every implementation makes of its arguments (q ``[B, Lq, Hq, D]``, k ``[B, Lk, Hkv, D]``):
  GQA needs ``Hq`` to be a multiple of ``Hkv``; keys default to the queries' metadata
  (self-attention) and the scale to ``D**-0.5``. Returns (key metadata, scale)."""
  hq, d, hkv = q.shape[2], q.shape[3], k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
  return (q_meta if k_meta is None else k_meta), (d**-0.5 if scale is None else float(scale))


def _masked_scores(q, k, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
  """q [B, c, Hkv, G, D], k [B, Lk, Hkv, D] -> fp32 scores [B, Hkv, G, c, Lk], -inf where hidden."""
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(visibility(q_meta, k_meta)[:, None, None], scores, -jnp.inf)


def _forward_chunk(q, k, v, q_meta, k_meta, scale):
  """One query tile: (out [B, c, Hkv, G, D] fp32, logsumexp [B, Hkv, G, c]; -inf for rows seeing nothing)."""
  scores = _masked_scores(q, k, q_meta, k_meta, scale)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max)  # hidden entries: exp(-inf) = 0
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom > 0, denom, 1.0)  # fully hidden rows (padding) give zeros
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)),
                  -jnp.inf)
  return out, lse


def _backward_chunk(q, k, v, q_meta, k_meta, out, lse, d_out, scale):
  """Flash-attention gradients of one query tile, recomputing its probabilities from ``lse``."""
  scores = _masked_scores(q, k, q_meta, k_meta, scale)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  probs = jnp.where(jnp.isfinite(lse)[..., None], probs, 0.0)  # [B, Hkv, G, c, Lk]
  d_out32 = d_out.astype(jnp.float32)
  dv = jnp.einsum("bhgqk,bqhgd->bkhd", probs, d_out32)
  dp = jnp.einsum("bqhgd,bkhd->bhgqk", d_out32, v.astype(jnp.float32))
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", d_out32, out.astype(jnp.float32))
  ds = probs * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32))
  dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q.astype(jnp.float32))
  return dq, dk, dv


def _chunked(x, n_chunks, chunk):
  """[B, n*c, ...] -> [n, B, c, ...]."""
  b = x.shape[0]
  return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)


def _unchunked(x):
  """[n, B, c, ...] -> [B, n*c, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_core(q, k, v, q_meta, k_meta, scale, chunk):
  """q [B, n*c, Hkv, G, D] (n*c = padded length) -> out [B, n*c, Hkv, G, D] fp32."""
  return _attention_fwd(q, k, v, q_meta, k_meta, scale, chunk)[0]


def _attention_fwd(q, k, v, q_meta, k_meta, scale, chunk):
  n = q.shape[1] // chunk
  if n == 1:
    out, lse = _forward_chunk(q, k, v, q_meta, k_meta, scale)
  else:
    out, lse = jax.lax.map(
        lambda a: _forward_chunk(a[0], k, v, TokenMeta(*a[1]), k_meta, scale),
        (_chunked(q, n, chunk), tuple(_chunked(x, n, chunk) for x in q_meta)))
    out, lse = _unchunked(out), jnp.concatenate(list(lse), axis=-1)
  return out, (q, k, v, q_meta, k_meta, out, lse)


def _attention_bwd(scale, chunk, residuals, d_out):
  q, k, v, q_meta, k_meta, out, lse = residuals
  n = q.shape[1] // chunk
  if n == 1:
    dq, dk, dv = _backward_chunk(q, k, v, q_meta, k_meta, out, lse, d_out, scale)
  else:
    lse_chunks = jnp.moveaxis(lse.reshape(*lse.shape[:3], n, chunk), 3, 0)

    def body(carry, xs):
      q_c, meta_c, out_c, lse_c, d_c = xs
      dq_c, dk_c, dv_c = _backward_chunk(q_c, k, v, TokenMeta(*meta_c), k_meta, out_c, lse_c, d_c, scale)
      return (carry[0] + dk_c, carry[1] + dv_c), dq_c

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), (
        _chunked(q, n, chunk), tuple(_chunked(x, n, chunk) for x in q_meta), _chunked(out, n, chunk),
        lse_chunks, _chunked(d_out, n, chunk)))
    dq = _unchunked(dq)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


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
  ``q.dtype``. The gradient is flash-attention style (a custom VJP that recomputes each query
  tile's probabilities from the saved logsumexp), so neither pass keeps more than one
  ``[B, H, query_chunk, Lk]`` tile alive.
  """
  k_meta, scale = checked_defaults(q, k, q_meta, k_meta, scale)
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  chunk = min(lq, query_chunk)
  n_chunks = -(-lq // chunk)
  pad = n_chunks * chunk - lq
  qg = q.reshape(b, lq, hkv, hq // hkv, d)  # [B, Lq, Hkv, G, D]
  if pad:
    qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q_meta = TokenMeta(*(jnp.pad(x, ((0, 0), (0, pad))) for x in q_meta))  # kind 0 = padding
  out = _attention_core(qg, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta), scale, chunk)
  return out[:, :lq].reshape(b, lq, hq, d).astype(q.dtype)
