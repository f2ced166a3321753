"""Which slots of a packed row each ``sequence`` shard holds: contiguous pieces, or zig-zag.

Why. Under context parallelism shard ``i`` holds the ``i``-th piece of each buffer (``model/
row_shards.py``). The mask is causal-like (later tokens see more keys), so with contiguous
pieces the last shard of a whole-story row does several times the attention work of the first,
and every step waits for it. Visibility comes from metadata, never from slot order, so the packer
may put any token in any slot: ``zigzag`` cuts each buffer into ``2 S`` chunks and gives shard
``i`` chunks ``i`` and ``2 S - 1 - i`` (one early, one late), which evens the work while each
chunk stays contiguous (the kernels' block summaries still prove most tiles empty).
``unimage_jax/attention/load_balance.py`` measures both; README "Context parallelism" has the
figures that decided the default.

Everything in a row is per slot (tokens, labels, loss weights, positions, latents, metadata)
except ``vit_dest``, the und slot each ViT token is written to, which is remapped.
"""

from __future__ import annotations

import numpy as np

SLOT_LAYOUTS = ("contiguous", "zigzag")


def shard_order(n: int, shards: int, slot_layout: str) -> np.ndarray:
  """``perm [n]``: slot ``p`` of the permuted buffer holds slot ``perm[p]`` of the packed one.

  Shard ``i`` of the permuted buffer is ``perm[i * n / S:(i + 1) * n / S]``.
  """
  if slot_layout not in SLOT_LAYOUTS:
    raise ValueError(f"slot layout must be one of {SLOT_LAYOUTS}, got {slot_layout!r}")
  if slot_layout == "contiguous" or shards == 1:
    return np.arange(n)
  if n % (2 * shards):
    raise ValueError(f"a zig-zag buffer of {n} slots needs a multiple of 2 * {shards} shards")
  c = n // (2 * shards)
  chunks = np.arange(n).reshape(2 * shards, c)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def permute_row(row: dict[str, np.ndarray], shards: int, slot_layout: str) -> dict[str, np.ndarray]:
  """A packed row (``layout.empty_row`` keys, no batch axis) with its und and gen slots reordered."""
  if slot_layout == "contiguous" or shards == 1:
    return row
  lu, lg = row["und_token_ids"].shape[0], row["gen_latents"].shape[0]
  pu, pg = shard_order(lu, shards, slot_layout), shard_order(lg, shards, slot_layout)
  out = {}
  for k, v in row.items():
    if k.startswith("und_"):
      out[k] = v[pu]
    elif k.startswith("gen_"):
      out[k] = v[pg]
    else:
      out[k] = v
  where = np.empty(lu + 1, np.int64)  # old und slot -> new slot; lu (the drop sentinel) stays lu
  where[pu] = np.arange(lu)
  where[lu] = lu
  out["vit_dest"] = where[row["vit_dest"]].astype(row["vit_dest"].dtype)
  return out
