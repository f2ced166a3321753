"""Device mesh and logical-axis sharding (MaxText-style rules from the config).

Parameters carry logical axis names (``("layers", "embed", "heads", "head_dim")``); the config's
``logical_axis_rules`` map each name to mesh axes. Resolution drops a mesh axis already used by an
earlier dimension of the same tensor (e.g. a square ``[embed, embed]`` weight shards only its
first dimension) and any mesh axis that does not divide the dimension, so every rule set yields a
valid sharding; :func:`check_mesh_compatible` reports the divisibility problems that matter
(heads vs tensor size) before compiling.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimage_jax.config_validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves ``-1`` ("the rest") and checks the product against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{axis}={s} must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                        f"divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                      f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_mesh_compatible(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Refuses meshes the model cannot be split on, naming the fields involved."""
  m, sizes = config.model, dict(mesh.shape)
  errors = []
  tensor = sizes.get("tensor", 1)
  for name in ("num_heads", "num_kv_heads", "mlp_dim"):
    if m[name] % tensor:
      errors.append(f"config.model.{name}={m[name]} is not divisible by config.mesh.tensor={tensor}")
  if m.vit.enabled and m.vit.num_heads % tensor:
    errors.append(f"config.model.vit.num_heads={m.vit.num_heads} is not divisible by config.mesh.tensor={tensor}")
  batch_shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  if config.data.batch_size % batch_shards:
    errors.append(f"config.data.batch_size={config.data.batch_size} is not divisible by data*fsdp={batch_shards}")
  if errors:
    raise ConfigError("mesh/config mismatch:\n  " + "\n  ".join(errors))


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], rules: Sequence[tuple[str, Any]], mesh: Mesh
) -> P:
  """Logical axis names -> PartitionSpec for one array."""
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    chosen = []
    for axis in targets:
      size = mesh.shape.get(axis, 1)
      if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in chosen)):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
  return P(*spec)


def tree_shardings(abstract_tree, axes_tree, rules, mesh: Mesh):
  """NamedShardings for a pure-dict tree of arrays given the matching tree of logical axes."""
  return jax.tree.map(
      lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, rules, mesh)),
      abstract_tree, axes_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Packed rows are split over the data-parallel axes; every other dim is replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))
