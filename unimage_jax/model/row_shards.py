"""How a context-parallel row is laid out for its joint attention: ``[und_i | gen_i]`` per shard.

Why. With ``config.mesh.sequence = S`` each device holds ``Lu / S`` slots of a row's und buffer and
``Lg / S`` of its gen buffer (the ``length`` rule), so each expert runs densely on its local slots
with no communication. The joint attention needs one sequence of both buffers; concatenating
``[und | gen]`` along a sharded axis would move half of every buffer between devices. Visibility
comes from per-token metadata, never from slot order, so any permutation of the concatenation
computes the same attention: shard ``i`` takes ``[und_i | gen_i]`` (its own und slots, then its own
gen slots). In the global view that is a reshape to ``[B, S, l, ...]``, a concatenation along
``l`` and a reshape back, all local to each shard. With ``S = 1`` it is the plain ``[und | gen]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimage_jax.attention import mesh_context
from unimage_jax.layout import TokenMeta, token_meta


def length_shards(und_len: int, gen_len: int) -> int:
  """Pieces each row is cut into in the step being traced (1 outside a mesh, or without CP)."""
  mesh = mesh_context.current_mesh()
  if mesh is None:
    return 1
  from unimage_jax.sharding import length_shards as shards_of
  s = shards_of(mesh, mesh_context.current_rules())
  if s > 1 and (und_len % s or gen_len % s):
    raise ValueError(f"row buffers of {und_len} und and {gen_len} gen slots do not split into {s} sequence "
                     "shards (config.data.und_len / gen_len must be divisible by config.mesh.sequence)")
  return s


def join(und: jax.Array, gen: jax.Array, shards: int) -> jax.Array:
  """und ``[B, Lu, ...]``, gen ``[B, Lg, ...]`` -> ``[B, Lu + Lg, ...]``, shard i = ``[und_i | gen_i]``."""
  if shards == 1:
    return jnp.concatenate([und, gen], axis=1)
  b = und.shape[0]
  u = und.reshape(b, shards, und.shape[1] // shards, *und.shape[2:])
  g = gen.reshape(b, shards, gen.shape[1] // shards, *gen.shape[2:])
  joined = jnp.concatenate([u, g], axis=2)  # [B, S, (Lu + Lg) / S, ...]
  return joined.reshape(b, und.shape[1] + gen.shape[1], *und.shape[2:])


def split(x: jax.Array, und_len: int, shards: int) -> tuple[jax.Array, jax.Array]:
  """The inverse of :func:`join`: ``[B, L, ...]`` -> (und ``[B, Lu, ...]``, gen ``[B, L - Lu, ...]``)."""
  if shards == 1:
    return x[:, :und_len], x[:, und_len:]
  b, l = x.shape[:2]
  lu = und_len // shards
  x = x.reshape(b, shards, l // shards, *x.shape[2:])
  und, gen = x[:, :, :lu], x[:, :, lu:]
  return (und.reshape(b, und_len, *x.shape[3:]), gen.reshape(b, l - und_len, *x.shape[3:]))


def join_slots(und_len: int, gen_len: int, shards: int):
  """Host-side index map of :func:`join`: position p of the joined row holds slot ``index[p]`` of
  ``[und | gen]`` (numpy; for measurements and tests)."""
  import numpy as np
  return np.asarray(join(jnp.arange(und_len)[None], und_len + jnp.arange(gen_len)[None], shards))[0]


def joint_meta(batch) -> TokenMeta:
  """The visibility metadata of a row's joint attention sequence (fields ``[B, Lu + Lg]``), laid
  out as :func:`join` lays out the row's activations."""
  und, gen = token_meta(batch, "und"), token_meta(batch, "gen")
  shards = length_shards(und[0].shape[1], gen[0].shape[1])
  return TokenMeta(*(join(jnp.asarray(u), jnp.asarray(g), shards) for u, g in zip(und, gen)))
