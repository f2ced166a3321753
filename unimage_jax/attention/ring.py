"""Ring attention over the ``sequence`` axis (the alternative to all-gathering K/V), per shard.

Runs inside ``shard_map``: each shard keeps its queries and passes its key/value block (and key
metadata) around the ring with ``ppermute``, ``S`` steps; each step runs the block-skipping XLA
flash tiles (:mod:`blocked_xla`, EMPTY tiles skipped from the block summaries of that step's
keys) and merges the partial result into the running output with the logsumexp (online
softmax across steps). The backward pass walks the ring again with the final logsumexp: each
step's dQ stays, dK/dV travel with their key block and arrive home after the ``S``-th rotation.
Only two key blocks (plus their dK/dV) are live per shard, ``2 L / S`` instead of the gathered
``L``; the price is ``S - 1`` dependent collective steps per pass. ``context_parallel.py`` uses
the all-gather by default; README "Context parallelism" compares the two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unimage_jax.attention import blocked_xla
from unimage_jax.layout import TokenMeta


def _rotate(tree, axis_name, shards: int):
  """Sends every leaf to the next shard of the ring (shard i -> i + 1)."""
  perm = [(i, (i + 1) % shards) for i in range(shards)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring(q, k, v, q_meta, k_meta, scale, block_q, block_k, axis_name, shards):
  """q [B, Hkv, G, Lq, D], k/v [B, Hkv, Lk, D] (this shard's) -> fp32 out [B, Hkv, G, Lq, D]."""
  return _ring_fwd(q, k, v, q_meta, k_meta, scale, block_q, block_k, axis_name, shards)[0]


def _ring_fwd(q, k, v, q_meta, k_meta, scale, block_q, block_k, axis_name, shards):
  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)
  kv = (k, v, k_meta)
  for step in range(shards):
    out_s, res = blocked_xla._flash_fwd(q, kv[0], kv[1], q_meta, kv[2], scale, block_q, block_k)
    lse_s = res[6]
    new = jnp.logaddexp(lse, lse_s)  # -inf where no key seen yet
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w_old = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe), 0.0)[..., None]
    w_new = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - safe), 0.0)[..., None]
    out, lse = out * w_old + out_s * w_new, new
    if step < shards - 1:
      kv = _rotate(kv, axis_name, shards)
  return out, (q, k, v, q_meta, k_meta, out, lse)


def _ring_bwd(scale, block_q, block_k, axis_name, shards, residuals, d_out):
  q, k, v, q_meta, k_meta, out, lse = residuals
  dq = jnp.zeros(q.shape, jnp.float32)
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  kv = (k, v, k_meta)
  for step in range(shards):
    live = blocked_xla._live_tiles(q_meta, kv[2], block_q, block_k)
    dq_s, dk_s, dv_s, _, _ = blocked_xla._flash_bwd(
        scale, block_q, block_k, (q, kv[0], kv[1], q_meta, kv[2], out, lse, live), d_out)
    dq, dk, dv = dq + dq_s.astype(jnp.float32), dk + dk_s.astype(jnp.float32), dv + dv_s.astype(jnp.float32)
    if step < shards - 1:
      kv, (dk, dv) = _rotate(kv, axis_name, shards), _rotate((dk, dv), axis_name, shards)
  dk, dv = _rotate((dk, dv), axis_name, shards)  # the S-th rotation brings them to their owner
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q: jax.Array,  # [B, l, Hq, D], this shard's queries
    k: jax.Array,  # [B, l, Hkv, D], this shard's keys
    v: jax.Array,  # [B, l, Hkv, D]
    q_meta: TokenMeta,  # fields [B, l]
    k_meta: TokenMeta,  # fields [B, l]
    *,
    axis_name,
    shards: int,
    scale: float | None = None,
    block_q: int = blocked_xla.DEFAULT_BLOCK,
    block_k: int = blocked_xla.DEFAULT_BLOCK,
) -> jax.Array:  # [B, l, Hq, D], dtype of q
  """The shard's queries against the whole row, its K/V passed around ``axis_name`` (in shard_map)."""
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  scale = d**-0.5 if scale is None else float(scale)
  block_q, block_k = min(block_q, lq), min(block_k, k.shape[1])
  qg = q.reshape(b, lq, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, l, D]
  kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, Hkv, l, D]
  qg = blocked_xla._pad_to(qg, 3, block_q)
  kt, vt = blocked_xla._pad_to(kt, 2, block_k), blocked_xla._pad_to(vt, 2, block_k)
  q_meta = TokenMeta(*(blocked_xla._pad_to(jnp.asarray(x), 1, block_q) for x in q_meta))
  k_meta = TokenMeta(*(blocked_xla._pad_to(jnp.asarray(x), 1, block_k) for x in k_meta))
  out = _ring(qg, kt, vt, q_meta, k_meta, scale, block_q, block_k, axis_name, shards)
  return out[:, :, :, :lq].transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d).astype(q.dtype)
