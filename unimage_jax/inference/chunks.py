"""New-token chunks: segments laid out like a packed row, continuing each row's cached stream."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from unimage_jax import layout
from unimage_jax.model.unimage import latent_token_dim


def chunk_from_segments(segments_per_row: Sequence[Sequence[layout.Segment]], cache, model_cfg: ml_collections.ConfigDict):
  """Host-side: one list of segments per row -> chunk dict ``[B, ...]`` offset by the cache state.

  Rows may hold different segments; buffers are sized by the largest row (the rest is padding).
  """
  lens = [layout.sample_lengths(s) for s in segments_per_row]
  sizes = layout.BufferSizes(max(l[0] for l in lens), max(l[1] for l in lens), max(l[2] for l in lens),
                             max(max(l[3] for l in lens), 1))
  m = model_cfg
  rows = [layout.pack_row([segs] if segs else [], sizes, latent_token_dim(m), m.max_latent_grid,
                          m.vit.patch_size**2 * 3, m.vit.max_patches_per_side) for segs in segments_per_row]
  chunk = layout.stack_rows(rows)
  offsets = {"positions": np.asarray(cache.next_position), "orders": np.asarray(cache.next_order),
             "segment_ids": np.asarray(cache.next_segment)}
  for prefix in ("und", "gen"):
    real = chunk[f"{prefix}_segment_kinds"] != layout.KIND_PAD
    for name, off in offsets.items():
      key = f"{prefix}_{name}"
      chunk[key] = np.where(real, chunk[key] + off[:, None], chunk[key]).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in chunk.items()}


def text_token_chunk(tokens, cache, kind_if_live, live, vit_patch_dim: int, latent_dim: int):
  """In-graph: one text token per row (``tokens [B]``) continuing the cache; dead rows are padding."""
  b = tokens.shape[0]
  col = lambda x: x[:, None].astype(jnp.int32)
  kind = jnp.where(live, kind_if_live, layout.KIND_PAD)
  empty_i = jnp.zeros((b, 0), jnp.int32)
  return {
      "und_token_ids": col(tokens),
      "und_sample_ids": col(jnp.where(live, 0, -1)),
      "und_segment_ids": col(cache.next_segment),
      "und_segment_kinds": col(kind),
      "und_orders": col(cache.next_order),
      "und_positions": col(cache.next_position),
      "gen_latents": jnp.zeros((b, 0, latent_dim), jnp.float32),
      "gen_latent_pos": empty_i,
      "gen_sample_ids": empty_i,
      "gen_segment_ids": empty_i,
      "gen_segment_kinds": empty_i,
      "gen_orders": empty_i,
      "gen_positions": empty_i,
      "vit_patches": jnp.zeros((b, 0, vit_patch_dim), jnp.float32),
      "vit_pos_ids": empty_i,
      "vit_image_ids": empty_i,
      "vit_dest": empty_i,
  }
