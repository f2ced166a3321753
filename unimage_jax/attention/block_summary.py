"""Per-block summaries of TokenMeta and the (q-block, k-block) classification used to skip work.

A fused attention kernel visits a grid of (query block, key block) tiles. Most tiles of a packed
row are entirely masked (different samples, keys after every query, noise segments seen from
outside). Before the kernel runs, this module summarises every block of ``block`` consecutive
tokens with a handful of min/max statistics (O(L / block) values) and classifies every tile as

* ``EMPTY`` (0): provably no visible (q, k) pair -> the kernel neither loads nor computes it;
* ``PARTIAL`` (1): some pairs may be visible -> computed with the in-kernel mask;
* ``FULL`` (2): provably every pair is visible -> computed without evaluating the mask.

The classification is conservative: EMPTY and FULL are exact claims (checked against
:func:`unimage_jax.attention.reference.visibility` in ``tests/test_block_summary.py``); anything
undecidable from the summaries is PARTIAL. Only ``[B, nq, nk]`` tile flags are ever built, never
an ``L x L`` array.

The kernels consume the classification as compressed per-row lists (like a CSR matrix): for each
query block the ascending list of non-empty key blocks, padded to a static width by repeating
the last entry (so a pipelined kernel issues no new DMA for the padding steps), plus a count.
The transpose (per key block, the list of query blocks) drives the dK/dV backward kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unimage_jax import layout
from unimage_jax.layout import TokenMeta

EMPTY = 0
PARTIAL = 1
FULL = 2

_BIG = np.iinfo(np.int32).max
_SMALL = np.iinfo(np.int32).min


class BlockSummary(NamedTuple):
  """Statistics of each block of ``block`` tokens; every field is int32/bool ``[B, n_blocks]``.

  Min/max fields are taken over the block's non-padding tokens (``_BIG``/``_SMALL`` if none).
  """

  any_valid: jax.Array  # some token is not padding
  all_valid: jax.Array  # no token is padding
  sample_min: jax.Array
  sample_max: jax.Array
  segment_min: jax.Array
  segment_max: jax.Array
  order_min: jax.Array
  order_max: jax.Array
  # order_min over non-noise tokens: noise keys are visible only inside their own segment
  order_min_causal: jax.Array
  any_full: jax.Array  # some token is VIT/CLEAN/NOISE (visible by segment, regardless of order)
  all_full: jax.Array  # every valid token is VIT/CLEAN/NOISE
  any_noise: jax.Array


class BlockLists(NamedTuple):
  """Compressed tile lists for one orientation (rows = the outer blocks).

  ``index[b, r, t]`` for ``t < count[b, r]`` is the t-th non-empty inner block of outer block r
  (ascending); for ``t >= count`` it repeats the last valid entry (0 if the row is empty).
  ``full[b, r, t]`` is 1 when that tile is FULL (no mask needed), else 0.
  """

  index: jax.Array  # int32 [B, n_outer, n_inner]
  full: jax.Array  # int32 [B, n_outer, n_inner]
  count: jax.Array  # int32 [B, n_outer]


def _blocked(x: jax.Array, block: int) -> jax.Array:
  b, l = x.shape
  if l % block:
    raise ValueError(f"length {l} is not a multiple of the block size {block}")
  return x.reshape(b, l // block, block)


def summarize(meta: TokenMeta, block: int) -> BlockSummary:
  """Block statistics of ``meta`` (fields ``[B, L]``, ``L`` a multiple of ``block``)."""
  s, g, kind, o = (_blocked(jnp.asarray(x, jnp.int32), block) for x in meta)
  valid = kind != layout.KIND_PAD
  full = valid & layout.is_full_kind(kind)
  noise = valid & (kind == layout.KIND_NOISE)

  def vmin(x, m=valid):
    return jnp.min(jnp.where(m, x, _BIG), axis=-1)

  def vmax(x, m=valid):
    return jnp.max(jnp.where(m, x, _SMALL), axis=-1)

  return BlockSummary(
      any_valid=jnp.any(valid, -1),
      all_valid=jnp.all(valid, -1),
      sample_min=vmin(s),
      sample_max=vmax(s),
      segment_min=vmin(g),
      segment_max=vmax(g),
      order_min=vmin(o),
      order_max=vmax(o),
      order_min_causal=vmin(o, valid & ~noise),
      any_full=jnp.any(full, -1),
      all_full=jnp.all(full | ~valid, -1),
      any_noise=jnp.any(noise, -1),
  )


def classify(qs: BlockSummary, ks: BlockSummary) -> jax.Array:
  """Tile classes ``int32 [B, nq, nk]`` (EMPTY / PARTIAL / FULL) from the two summaries.

  :func:`layout.visibility_rule` is monotone in each of its pair predicates, so it is evaluated
  twice on bounds of them over the tile: with what *some* pair may satisfy (the tile may hold a
  visible pair, else EMPTY) and with what *every* pair must satisfy (all pairs are visible: FULL).
  """
  q = jax.tree.map(lambda x: x[:, :, None], qs)
  k = jax.tree.map(lambda x: x[:, None, :], ks)
  samples_meet = (q.sample_min <= k.sample_max) & (k.sample_min <= q.sample_max)
  segments_meet = (q.segment_min <= k.segment_max) & (k.segment_min <= q.segment_max)
  # Noise keys are left out of the causal bound (order_min_causal): they count as open keys
  # that are never before a query, and stay visible through their segment (noise is full).
  any_visible = layout.visibility_rule(
      same_sample=q.any_valid & k.any_valid & samples_meet, same_segment=segments_meet,
      key_not_later=k.order_min_causal <= q.order_max, key_full=k.any_full, key_open=True)

  one_sample = ((q.sample_min == q.sample_max) & (k.sample_min == k.sample_max)
                & (q.sample_min == k.sample_min))
  one_segment = ((q.segment_min == q.segment_max) & (k.segment_min == k.segment_max)
                 & (q.segment_min == k.segment_min))
  all_visible = layout.visibility_rule(
      same_sample=q.all_valid & k.all_valid & one_sample, same_segment=one_segment,
      key_not_later=k.order_max <= q.order_min, key_full=k.all_full, key_open=~k.any_noise)
  return jnp.where(any_visible, jnp.where(all_visible, FULL, PARTIAL), EMPTY).astype(jnp.int32)


def classify_meta(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int) -> jax.Array:
  """:func:`classify` straight from metadata."""
  return classify(summarize(q_meta, block_q), summarize(k_meta, block_k))


def block_lists(classes: jax.Array) -> BlockLists:
  """Compresses ``classes [B, n_outer, n_inner]`` into per-row lists of non-empty inner blocks."""
  b, n_outer, n_inner = classes.shape
  nonempty = classes != EMPTY
  j = jnp.arange(n_inner, dtype=jnp.int32)
  # non-empty blocks first (ascending), then empty ones
  key = jnp.where(nonempty, j, n_inner + j)
  order = jnp.argsort(key, axis=-1).astype(jnp.int32)
  count = jnp.sum(nonempty, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  index = jnp.where(j < count[..., None], order, last)
  full = jnp.take_along_axis(classes, index, axis=-1) == FULL
  full = jnp.where(j < count[..., None], full, False).astype(jnp.int32)
  return BlockLists(index=index, full=full, count=count)


def skipped_fraction(classes) -> dict[str, float]:
  """Fractions of tiles that are EMPTY (skipped), PARTIAL (masked) and FULL (mask-free)."""
  c = np.asarray(classes)
  n = c.size
  return {
      "tiles": int(n),
      "skipped": float(np.sum(c == EMPTY) / n),
      "partial": float(np.sum(c == PARTIAL) / n),
      "full": float(np.sum(c == FULL) / n),
  }


def visible_fraction(q_meta: TokenMeta, k_meta: TokenMeta | None = None,
                     query_chunk: int = 1024) -> float:
  """Fraction of (q, k) pairs that are visible, computed in query chunks (host-side numpy)."""
  k_meta = q_meta if k_meta is None else k_meta
  from unimage_jax.attention.reference import visibility  # local: avoid a cycle at import
  qm = [np.asarray(x) for x in q_meta]
  km = [np.asarray(x) for x in k_meta]
  lq, lk = qm[0].shape[-1], km[0].shape[-1]
  total = 0
  for start in range(0, lq, query_chunk):
    chunk = TokenMeta(*(x[:, start:start + query_chunk] for x in qm))
    total += int(np.sum(np.asarray(visibility(chunk, TokenMeta(*km)))))
  return total / (qm[0].shape[0] * lq * lk)


def exact_tile_classes(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int):
  """Ground truth tile classes from the dense visibility, one query block at a time (numpy,
  host side; O(block_q * Lk) memory). For reports and tests of :func:`classify`'s tightness."""
  from unimage_jax.attention.reference import visibility  # local: avoid a cycle at import
  qm = [np.asarray(x) for x in q_meta]
  km = TokenMeta(*(np.asarray(x) for x in k_meta))
  b, lq = qm[0].shape
  lk = km[0].shape[-1]
  out = np.zeros((b, lq // block_q, lk // block_k), np.int32)
  vis_fn = jax.jit(visibility)
  for i in range(lq // block_q):
    chunk = TokenMeta(*(x[:, i * block_q:(i + 1) * block_q] for x in qm))
    vis = np.asarray(vis_fn(chunk, km)).reshape(b, block_q, lk // block_k, block_k)
    any_v, all_v = vis.any(axis=(1, 3)), vis.all(axis=(1, 3))
    out[:, i] = np.where(all_v, FULL, np.where(any_v, PARTIAL, EMPTY))
  return out
