"""Block-skipping flash attention in plain XLA: the fast path where no Pallas kernel runs (CPU).

Why. The reference attention (:mod:`reference`) evaluates every (query, key) pair of a row as one
fp32 score tile and makes about ten full passes over it (mask, max, exp, sum, recompute in the
backward pass). On a CPU those passes, not the matmuls, dominate the train step. This version
walks ``block_q x block_k`` tiles with an online softmax (flash attention), so each tile stays in
cache, and skips tiles that :mod:`block_summary` proves EMPTY in every row of the batch (other
samples of a packed row, keys after every query, noise segments seen from outside) with a
``lax.cond``, the same summaries the Pallas kernels use. The gradient is a custom VJP that
recomputes each tile's probabilities from the saved logsumexp and skips the same tiles; dK/dV
accumulate in place in the loop carry. Memory: O(L * D) plus one tile; no ``L x L`` array.

Semantics are exactly :func:`reference.reference_attention`'s (same mask rule, fp32 softmax,
zero output for queries that see nothing); ``tests/test_attention_kernel.py`` holds values and
gradients to the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unimage_jax.attention import block_summary
from unimage_jax.attention.reference import checked_defaults, visibility
from unimage_jax.layout import TokenMeta

DEFAULT_BLOCK = 128


def _block(x: jax.Array, i, size: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _meta_block(meta: TokenMeta, i, size: int) -> TokenMeta:
  return TokenMeta(*(_block(x, i, size, 1) for x in meta))


def _masked_tile(q_blk, k_blk, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
  """q [B, Hkv, G, bq, D], k [B, Hkv, bk, D] -> fp32 scores and visibility [B, 1, 1, bq, bk]."""
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  return s, visibility(q_meta, k_meta)[:, None, None]


def _live_tiles(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int) -> jax.Array:
  """bool [nq, nk]: the tile may hold a visible pair in some row (EMPTY tiles are skipped)."""
  classes = block_summary.classify_meta(q_meta, k_meta, block_q, block_k)  # [B, nq, nk]
  return jnp.any(classes != block_summary.EMPTY, axis=0)


def _unblock(x: jax.Array) -> jax.Array:
  """[n, B, H, G, b, ...] -> [B, H, G, n * b, ...]."""
  x = jnp.moveaxis(x, 0, 3)
  return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], *x.shape[5:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_meta, k_meta, scale, block_q, block_k):
  """q [B, Hkv, G, Lq, D], k/v [B, Hkv, Lk, D] (lengths multiples of the blocks) -> fp32 out."""
  return _flash_fwd(q, k, v, q_meta, k_meta, scale, block_q, block_k)[0]


def _flash_fwd(q, k, v, q_meta, k_meta, scale, block_q, block_k):
  b, h, g, lq, d = q.shape
  nq, nk = lq // block_q, k.shape[2] // block_k
  live = _live_tiles(q_meta, k_meta, block_q, block_k)

  def query_block(i):
    q_blk, qm = _block(q, i, block_q, 3), _meta_block(q_meta, i, block_q)

    def key_block(carry, j):
      def tile(carry):
        m_prev, l_prev, acc = carry  # [B, H, G, bq], [B, H, G, bq], [B, H, G, bq, D]
        v_blk = _block(v, j, block_k, 2)
        s, visible = _masked_tile(q_blk, _block(k, j, block_k, 2), qm, _meta_block(k_meta, j, block_k), scale)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw nothing yet
        p = jnp.exp(s - m_safe[..., None])
        rescale = jnp.where(jnp.isfinite(m_prev), jnp.exp(m_prev - m_safe), 0.0)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bhgqk,bhkd->bhgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return m_new, l_prev * rescale + jnp.sum(p, axis=-1), acc

      return jax.lax.cond(live[i, j], tile, lambda c: c, carry), None

    init = (jnp.full((b, h, g, block_q), -jnp.inf, jnp.float32), jnp.zeros((b, h, g, block_q), jnp.float32),
            jnp.zeros((b, h, g, block_q, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nk))
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # queries that see nothing (padding) output 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out, lse

  out, lse = jax.lax.map(query_block, jnp.arange(nq))
  out, lse = _unblock(out), _unblock(lse)  # [B, H, G, Lq, D], [B, H, G, Lq]
  return out, (q, k, v, q_meta, k_meta, out, lse, live)


def _flash_bwd(scale, block_q, block_k, residuals, d_out):
  q, k, v, q_meta, k_meta, out, lse, live = residuals
  b, h, g, lq, d = q.shape
  nq, nk = lq // block_q, k.shape[2] // block_k
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [B, H, G, Lq]

  def query_block(carry, i):
    q_blk, qm = _block(q, i, block_q, 3), _meta_block(q_meta, i, block_q)
    do_blk, lse_blk, delta_blk = _block(d_out, i, block_q, 3), _block(lse, i, block_q, 3), _block(delta, i, block_q, 3)
    seen = jnp.isfinite(lse_blk)[..., None]
    lse_safe = jnp.where(jnp.isfinite(lse_blk), lse_blk, 0.0)[..., None]

    def key_block(carry, j):
      def tile(carry):
        dq, dk, dv = carry
        k_blk, v_blk = _block(k, j, block_k, 2), _block(v, j, block_k, 2)
        s, visible = _masked_tile(q_blk, k_blk, qm, _meta_block(k_meta, j, block_k), scale)
        p = jnp.where(visible & seen, jnp.exp(s - lse_safe), 0.0)  # [B, H, G, bq, bk]
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk.astype(jnp.float32))
        ds = p * (dp - delta_blk[..., None]) * scale
        dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_blk.astype(jnp.float32))
        dk_blk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_blk.astype(jnp.float32))
        dv_blk = jnp.einsum("bhgqk,bhgqd->bhkd", p, do_blk)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, _block(dk, j, block_k, 2) + dk_blk, j * block_k, 2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, _block(dv, j, block_k, 2) + dv_blk, j * block_k, 2)
        return dq, dk, dv

      return jax.lax.cond(live[i, j], tile, lambda c: c, carry), None

    dq0 = jnp.zeros((b, h, g, block_q, d), jnp.float32)
    (dq, dk, dv), _ = jax.lax.scan(key_block, (dq0, *carry), jnp.arange(nk))
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(nq))
  return _unblock(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)  # metadata pads with 0 = KIND_PAD: padding sees and is seen by nothing


def blocked_attention(
    q: jax.Array,  # [B, Lq, Hq, D]
    k: jax.Array,  # [B, Lk, Hkv, D]
    v: jax.Array,  # [B, Lk, Hkv, D]
    q_meta: TokenMeta,  # fields int32 [B, Lq]
    k_meta: TokenMeta | None = None,  # fields int32 [B, Lk]; defaults to q_meta
    *,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B, Lq, Hq, D], dtype of q
  """The MoT generalized-causal attention, flash-style with EMPTY tiles skipped (any backend)."""
  k_meta, scale = checked_defaults(q, k, q_meta, k_meta, scale)
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  block_q, block_k = min(block_q, lq), min(block_k, k.shape[1])
  qg = q.reshape(b, lq, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, Lq, D]
  kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, Hkv, Lk, D]
  qg = _pad_to(qg, 3, block_q)
  kt, vt = _pad_to(kt, 2, block_k), _pad_to(vt, 2, block_k)
  q_meta = TokenMeta(*(_pad_to(jnp.asarray(x), 1, block_q) for x in q_meta))
  k_meta = TokenMeta(*(_pad_to(jnp.asarray(x), 1, block_k) for x in k_meta))
  out = _flash(qg, kt, vt, q_meta, k_meta, scale, block_q, block_k)  # [B, Hkv, G, Lq', D]
  return out[:, :, :, :lq].transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d).astype(q.dtype)
