"""Attention work per ``sequence`` shard of a packed row: visible pairs and kernel tiles.

Two measures, host side (numpy), for rows of any length (100k tokens included) without an
``L x L`` array:

* visible (query, key) pairs of each shard's queries: the ideal work, counted per query from the
  segment structure (:func:`visible_keys`), checked against the dense mask in the tests;
* non-empty (query block, key block) tiles of each shard's queries against the whole row, from
  the same block summaries the kernels use: the work the kernels actually do after skipping.

A step waits for its slowest shard, so ``max / mean`` over shards is the slowdown against a
perfect split.
"""

from __future__ import annotations

import numpy as np

from unimage_jax import layout
from unimage_jax.attention import block_summary
from unimage_jax.layout import TokenMeta


def visible_keys(meta: TokenMeta) -> np.ndarray:
  """Per query, how many keys it sees (int64 ``[L]``; one row, any slot order).

  From the rule: a non-noise key of the same sample with ``order <= order[q]``; every token of
  q's own noise segment; the tokens of q's own ViT/clean segment that come after q.
  """
  s, g, kind, o = (np.asarray(x).astype(np.int64) for x in meta)
  valid = kind != layout.KIND_PAD
  noise = kind == layout.KIND_NOISE
  full = (kind == layout.KIND_VIT) | (kind == layout.KIND_CLEAN)
  counts = np.zeros(s.shape, np.int64)
  causal = valid & ~noise
  for sample in np.unique(s[valid]):
    in_sample = s == sample
    keys = np.sort(o[in_sample & causal])
    q = in_sample & valid
    counts[q] += np.searchsorted(keys, o[q], side="right")
  for seg in np.unique(g[valid]):
    in_seg = (g == seg) & valid
    if np.any(noise & in_seg):  # a noise segment: its queries see all of it, nothing before it
      counts[in_seg] += np.sum(in_seg)  # (a noise query's causal keys are counted above)
    elif np.any(full & in_seg):  # a full segment: its queries also see its tokens after them
      orders = np.sort(o[in_seg])
      counts[in_seg] += len(orders) - np.searchsorted(orders, o[in_seg], side="right")
  return np.where(valid, counts, 0)


def shard_work(meta: TokenMeta, shards: int, block_q: int = 512, block_k: int = 512) -> dict[str, np.ndarray]:
  """Work of each of ``shards`` contiguous pieces of a joined row (``meta`` fields ``[L]``).

  Returns ``pairs [S]`` (visible pairs of the shard's queries) and ``tiles [S]`` (non-empty tiles
  of its queries against all keys, blocks of ``block_q`` x ``block_k``).
  """
  n = np.asarray(meta[0]).shape[-1]
  per_query = visible_keys(meta)
  local = n // shards
  pairs = per_query.reshape(shards, local).sum(axis=1)
  full = TokenMeta(*(np.asarray(x)[None] for x in meta))
  tiles = np.zeros(shards, np.int64)
  for i in range(shards):
    q = TokenMeta(*(x[:, i * local:(i + 1) * local] for x in full))
    q = TokenMeta(*(_pad(x, block_q, f) for x, f in zip(q, (-1, -1, 0, 0))))
    k = TokenMeta(*(_pad(x, block_k, f) for x, f in zip(full, (-1, -1, 0, 0))))
    tiles[i] = int(np.sum(np.asarray(block_summary.classify_meta(q, k, block_q, block_k)) != block_summary.EMPTY))
  return {"pairs": pairs, "tiles": tiles}


def _pad(x: np.ndarray, block: int, fill: int) -> np.ndarray:
  pad = (-x.shape[-1]) % block
  return np.pad(x, ((0, 0), (0, pad)), constant_values=fill) if pad else x


def imbalance(work: np.ndarray) -> float:
  """``max / mean`` over shards (1.0 = perfectly even)."""
  work = np.asarray(work, np.float64)
  return float(work.max() / max(work.mean(), 1e-12))
