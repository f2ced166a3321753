"""A static-shape KV cache over the joint (und + gen) token stream, one stream per batch row.

Every processed token, whichever expert computed it, leaves its per-layer k/v and its visibility
metadata here; new tokens attend to the cache under the same mask rule as training. Capacity is
static (``capacity`` slots), so jitted decode/denoise steps never recompile as the story grows;
unused slots are padding and invisible. Rows advance independently (``length [B]``), which is
what classifier-free guidance needs (each guidance branch is a row with its own context).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimage_jax import layout
from unimage_jax.errors import UserError
from unimage_jax.layout import TokenMeta


@flax.struct.dataclass
class KVCache:
  k: jax.Array  # [layers, B, P, Hkv, D]
  v: jax.Array  # [layers, B, P, Hkv, D]
  meta: TokenMeta  # fields [B, P]
  length: jax.Array  # [B] slots used
  next_position: jax.Array  # [B] RoPE position of the next token
  next_order: jax.Array  # [B] order of the next token
  next_segment: jax.Array  # [B] id of the next segment

  @property
  def capacity(self) -> int:
    return self.k.shape[2]


def empty_cache(model_cfg: ml_collections.ConfigDict, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  shape = (model_cfg.num_layers, batch, capacity, model_cfg.num_kv_heads, model_cfg.head_dim)
  zeros_i = jnp.zeros((batch, capacity), jnp.int32)
  meta = TokenMeta(zeros_i - 1, zeros_i - 1, zeros_i + layout.KIND_PAD, zeros_i)
  z = jnp.zeros((batch,), jnp.int32)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), meta, z, z, z, z)


def append(cache: KVCache, new_k, new_v, chunk) -> KVCache:
  """Writes a chunk's k/v ``[layers, B, n, Hkv, D]`` and metadata at each row's ``length``.

  Overflow is checked on the host by the caller (:func:`check_room`), since a jitted write past
  the end would silently clamp.
  """
  meta = TokenMeta(*(jnp.concatenate([u, g], axis=1)
                     for u, g in zip(layout.token_meta(chunk, "und"), layout.token_meta(chunk, "gen"))))
  n = new_k.shape[2]

  def write_row(buf, new, start):  # buf [P, ...], new [n, ...]
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)

  rows = jax.vmap(write_row)  # over B
  layers = jax.vmap(rows, in_axes=(0, 0, None))  # over layers
  k = layers(cache.k, new_k, cache.length)
  v = layers(cache.v, new_v, cache.length)
  new_meta = meta
  meta = TokenMeta(*(rows(c, m, cache.length) for c, m in zip(cache.meta, meta)))
  positions = jnp.concatenate([chunk["und_positions"], chunk["gen_positions"]], axis=1)
  real = new_meta.segment_kinds != layout.KIND_PAD  # [B, n]
  count = jnp.sum(real, axis=1)
  ends_noised = jnp.any(real & (new_meta.segment_kinds == layout.KIND_NOISE), axis=1)
  last_position = jnp.max(jnp.where(real, positions, -1), axis=1)
  return cache.replace(
      k=k, v=v, meta=meta, length=cache.length + n,
      next_position=jnp.where(count > 0, last_position + jnp.where(ends_noised, 0, 1), cache.next_position),
      next_order=cache.next_order + count,
      next_segment=jnp.maximum(cache.next_segment, jnp.max(jnp.where(real, new_meta.segment_ids + 1, 0), axis=1)),
  )


class CacheFullError(UserError, ValueError):
  """A write would pass the cache's static capacity (``config.inference.cache_capacity``)."""


def check_room(cache: KVCache, n: int) -> None:
  """Host-side guard: refuse to write ``n`` more slots than the cache holds, with the numbers."""
  used = int(np.max(np.asarray(cache.length)))
  if used + n > cache.capacity:
    raise CacheFullError(f"KV cache full: {used} of {cache.capacity} slots used, {n} more needed; raise "
                         "config.inference.cache_capacity (tools/direct.py --set=cache_capacity=N)")
