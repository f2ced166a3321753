"""Activation sharding constraints from ``config.logical_axis_rules``.

Why: parameters carry logical names, but without constraints XLA guesses the layouts of the
activations inside the scanned layers (and may, e.g., all-gather a whole hidden state where a
head-sharded one would do). Each activation that matters is named here, by the same rules as the
parameters, so changing a rule changes weights, activations and the attention kernel's
``shard_map`` specs together:

  embeddings out, per-layer hidden   ("batch", "length", "act_embed")
  q / attention out                  ("batch", "length", "act_heads", "head_dim")
  k / v                              ("batch", "length", "act_kv_heads", "head_dim")
  MLP hidden                         ("batch", "length", "act_mlp")
  logits chunks                      ("batch", "length", "act_vocab")

Outside a traced step's :func:`mesh_context.attention_mesh` (inference, single device) these are
no-ops.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import NamedSharding

from unimage_jax.attention import mesh_context

HIDDEN = ("batch", "length", "act_embed")
QUERY = ("batch", "length", "act_heads", "head_dim")
KEY_VALUE = ("batch", "length", "act_kv_heads", "head_dim")
MLP = ("batch", "length", "act_mlp")
LOGITS = ("batch", "length", "act_vocab")


def spec_for(names: Sequence[str | None], shape: Sequence[int]):
  """The PartitionSpec the current rules give an activation of ``shape`` (None: no mesh)."""
  from unimage_jax.sharding import logical_to_spec
  mesh = mesh_context.current_mesh()
  if mesh is None:
    return None
  return logical_to_spec(names, shape, mesh_context.current_rules(), mesh)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` of ``x`` to its logical ``names`` (one per dimension)."""
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match an array of shape {x.shape}")
  mesh = mesh_context.current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape)))
