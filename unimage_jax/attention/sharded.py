"""Runs MoT attention per shard under the training mesh (``jax.shard_map``).

The specs come from ``config.logical_axis_rules`` (the same names the activation constraints use,
``model/constraints.py``): rows over the ``batch`` rule's axes, query heads over ``act_heads``'.
The ``length`` and ``head_dim`` rules must leave those dimensions whole: every shard holds whole
packed rows, so the kernel's visibility and block skipping are local. Key/value heads are sharded consistently with query heads for GQA: query head ``h`` of a
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

from unimage_jax.attention import mesh_context
from unimage_jax.attention.dispatch import attention
from unimage_jax.layout import TokenMeta


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def kernel_specs(q_shape, rules, mesh: Mesh) -> tuple[P, P]:
  """(q/k/v spec ``[B, L, H, D]``, metadata spec ``[B, L]``) for the kernel's shard_map.

  Key/value heads take the query heads' axes (GQA needs query head ``h`` and its key/value head
  in the same shard; ``sharded_attention`` repeats key/value heads to make them divisible).
  """
  from unimage_jax.model.constraints import QUERY
  from unimage_jax.sharding import logical_to_spec
  spec = logical_to_spec(QUERY, q_shape, rules, mesh)
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"config.logical_axis_rules shard the attention's length or head_dim ({spec}); the "
                     "kernel needs whole rows and heads: map 'length' and 'head_dim' to None")
  return spec, P(spec[0], None)


def sharded_attention(
    q: jax.Array,  # [B, L, Hq, D]
    k: jax.Array,  # [B, L, Hkv, D]
    v: jax.Array,  # [B, L, Hkv, D]
    q_meta: TokenMeta,
    k_meta: TokenMeta | None = None,
    *,
    mesh: Mesh,
    rules=None,
    **attention_kwargs,
) -> jax.Array:
  """:func:`attention` inside ``shard_map`` over ``mesh``; kwargs go to :func:`attention`.

  ``rules``: ``config.logical_axis_rules`` (by default those of the step being traced, see
  ``mesh_context``). Axes missing from ``mesh`` are ignored, so the same call works on smaller meshes.
  """
  k_meta = q_meta if k_meta is None else k_meta
  rules = mesh_context.current_rules() if rules is None else rules
  act, meta_spec = kernel_specs(q.shape, rules, mesh)
  hq, hkv = q.shape[2], k.shape[2]
  tp = _axis_size(mesh, act[2])
  if hkv % tp:
    f = math.lcm(hkv, tp) // hkv
    k = jnp.repeat(k, f, axis=2)
    v = jnp.repeat(v, f, axis=2)
  meta = TokenMeta(*(meta_spec for _ in range(4)))
  fn = functools.partial(attention, **attention_kwargs)
  wrapped = jax.shard_map(
      lambda q, k, v, qm, km: fn(q, k, v, qm, km),
      mesh=mesh,
      in_specs=(act, act, act, meta, meta),
      out_specs=act,
      check_vma=False,
  )
  return wrapped(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))
