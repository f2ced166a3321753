"""Position encodings fixed by BAGEL (docs/ARCHITECTURE.md §10): RoPE, timestep sinusoid, 2D sin-cos."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """HF-style cos/sin tables ``[B, L, head_dim]`` (frequencies repeated over both halves)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, D]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x * cos + rotate_half(x) * sin`` on ``x [B, L, H, D]`` (rotate_half: halves, not pairs)."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """BAGEL timestep features: ``concat(cos(t f), sin(t f))`` with ``f = exp(-ln(P) k / half)``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  args = t.astype(jnp.float32)[..., None] * freqs  # [..., half]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [..., dim]


def sincos_2d_table(hidden: int, grid: int) -> np.ndarray:
  """Fixed ``[grid*grid, hidden]`` table; entry ``row*grid + col`` is ``concat(e(col), e(row))``.

  ``e(p) = concat(sin(p w), cos(p w))`` with ``w_k = 1 / 10000^(k / (hidden/4))``.
  """
  if hidden % 4:
    raise ValueError(f"2D sin-cos embedding needs hidden divisible by 4, got {hidden}")
  quarter = hidden // 4
  w = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [H/4]
  pos = np.arange(grid, dtype=np.float64)
  e = np.concatenate([np.sin(pos[:, None] * w), np.cos(pos[:, None] * w)], axis=1)  # [G, H/2]
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return np.concatenate([e[cols], e[rows]], axis=1).astype(np.float32)  # [G*G, H]
