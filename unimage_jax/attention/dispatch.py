"""Chooses the attention implementation named by ``model.attention_impl``."""

from __future__ import annotations

import jax

from unimage_jax.attention.reference import reference_attention
from unimage_jax.layout import TokenMeta

IMPLS = ("xla", "auto")


def attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta | None = None, *, impl: str = "xla",
              query_chunk: int = 1024, **_kernel_options):
  """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D] under the MoT visibility rule."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {IMPLS}")
  return reference_attention(q, k, v, q_meta, k_meta, query_chunk=query_chunk)
