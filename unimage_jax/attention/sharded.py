"""Runs MoT attention per shard under the training mesh (``jax.shard_map``).

Batch is sharded over ``("data", "fsdp")`` and heads over ``"tensor"``; the sequence is not
sharded (every shard holds whole packed rows, so the kernel's visibility and block skipping are
local). Key/value heads are sharded consistently with query heads for GQA: query head ``h`` of a
shard must find its key/value head ``h // G`` in the same shard. That holds when ``Hkv`` is a
multiple of the tensor-axis size; otherwise each key/value head is repeated ``f`` times
(``f = lcm(Hkv, T) / Hkv``, exact since ``Hq`` is a multiple of both) before sharding, and the
repeat's transpose sums the key/value gradients back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from unimage_jax.attention.dispatch import attention
from unimage_jax.layout import TokenMeta


def _present(mesh: Mesh, axes):
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  if not axes:
    return None
  return axes if len(axes) > 1 else axes[0]


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def sharded_attention(
    q: jax.Array,  # [B, L, Hq, D]
    k: jax.Array,  # [B, L, Hkv, D]
    v: jax.Array,  # [B, L, Hkv, D]
    q_meta: TokenMeta,
    k_meta: TokenMeta | None = None,
    *,
    mesh: Mesh,
    batch_axes=("data", "fsdp"),
    head_axes="tensor",
    **attention_kwargs,
) -> jax.Array:
  """:func:`attention` inside ``shard_map`` over ``mesh``; kwargs go to :func:`attention`.

  Axis names missing from ``mesh`` are ignored, so the same call works on smaller meshes.
  """
  k_meta = q_meta if k_meta is None else k_meta
  batch = _present(mesh, batch_axes)
  heads = _present(mesh, head_axes)
  hq, hkv = q.shape[2], k.shape[2]
  tp = _axis_size(mesh, heads)
  if hq % tp:
    raise ValueError(f"{hq} query heads cannot be sharded over a tensor axis of size {tp}")
  if hkv % tp:
    f = math.lcm(hkv, tp) // hkv
    k = jnp.repeat(k, f, axis=2)
    v = jnp.repeat(v, f, axis=2)
  act = P(batch, None, heads, None)
  meta = TokenMeta(*(P(batch, None) for _ in range(4)))
  fn = functools.partial(attention, **attention_kwargs)
  wrapped = jax.shard_map(
      lambda q, k, v, qm, km: fn(q, k, v, qm, km),
      mesh=mesh,
      in_specs=(act, act, act, meta, meta),
      out_specs=act,
      check_vma=False,
  )
  return wrapped(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))
