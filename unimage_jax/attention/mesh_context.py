"""The mesh (and logical-axis rules) the model shards over while a step is traced.

Why a context: the model is mesh-agnostic (the same module runs on one CPU, a GPU and a pod), but
under a sharded jit a Pallas kernel must run inside ``shard_map`` over the training mesh, and the
activation constraints (``model/constraints.py``) need the mesh and ``config.logical_axis_rules``.
The trainer and the AOT planner trace their step inside ``attention_mesh(mesh, rules)``; without
one, the kernel runs unsharded and constraints are no-ops (single device, inference).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

from jax.sharding import Mesh

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("unimage_attention_mesh", default=None)
_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("unimage_axis_rules", default=None)


@contextlib.contextmanager
def attention_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] | None = None):
  """``rules``: ``config.logical_axis_rules`` (the defaults of ``config_base`` when omitted)."""
  token = _MESH.set(mesh)
  rules_token = _RULES.set(None if rules is None else tuple(tuple(r) for r in rules))
  try:
    yield mesh
  finally:
    _RULES.reset(rules_token)
    _MESH.reset(token)


def current_mesh() -> Mesh | None:
  return _MESH.get()


def current_rules() -> tuple:
  rules = _RULES.get()
  if rules is None:
    from unimage_jax.sharding import default_rules
    rules = tuple(default_rules())
  return rules
