"""The mesh the model's attention kernels shard over while a step is traced.

Why a context: the model is mesh-agnostic (the same module runs on one CPU, a GPU and a pod), but
a Pallas kernel under a sharded jit must run inside ``shard_map`` over the training mesh. The
trainer and the AOT planner trace their step inside ``attention_mesh(mesh)``; without one, the
kernel runs unsharded (single device, inference).
"""

from __future__ import annotations

import contextlib
import contextvars

from jax.sharding import Mesh

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("unimage_attention_mesh", default=None)


@contextlib.contextmanager
def attention_mesh(mesh: Mesh | None):
  token = _MESH.set(mesh)
  try:
    yield mesh
  finally:
    _MESH.reset(token)


def current_mesh() -> Mesh | None:
  return _MESH.get()
