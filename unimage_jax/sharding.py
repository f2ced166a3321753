"""Device mesh and logical-axis sharding (MaxText-style rules from the config).

Parameters carry logical axis names (``("layers", "embed", "heads", "head_dim")``), and so do the
activations that matter (``("batch", "length", "act_embed")``, see ``model/constraints.py``); the
config's ``logical_axis_rules`` map each name to mesh axes. Every sharding of the program comes
from those rules: parameters, optimizer state, the batch (``batch_sharding``), the data
pipeline's global arrays, activation constraints and the attention kernel's ``shard_map`` specs.

Meshes follow the hardware: on TPU the device order comes from the ICI torus
(``mesh_utils.create_device_mesh``), so a ``tensor`` group is a block of neighbouring chips, and
``config.mesh.dcn_data`` / ``dcn_fsdp`` > 1 spread those axes across slices over the data-centre
network (``create_hybrid_device_mesh``: ICI axes inside a slice, DCN axes across slices). Resolution drops a mesh axis already used by an
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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimage_jax.config_validation import ConfigError

# ``sequence`` (context parallelism) sits next to ``tensor``: both exchange activations every
# layer, so both get the closest chips of the torus; data and fsdp are the outer axes.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
DCN_AXES = ("dcn_data", "dcn_fsdp")  # config.mesh fields: slices along data / fsdp


def default_rules() -> list[tuple[str, Any]]:
  from unimage_jax.config_base import base_config
  return list(base_config().logical_axis_rules)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves ``-1`` ("the rest") and checks the product against the device count."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
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


def dcn_shape(mesh_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Slices per mesh axis ``(dcn_data, dcn_fsdp, 1, 1)``; sequence and tensor never cross slices."""
  sizes = tuple(int(mesh_cfg.get(a, 1)) for a in DCN_AXES)
  for axis, s in zip(DCN_AXES, sizes):
    if s < 1:
      raise ConfigError(f"config.mesh.{axis}={s} must be >= 1 (slices along {axis[4:]})")
  return (*sizes, 1, 1)


def _slice_count(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The ``data x fsdp x sequence x tensor`` mesh over ``devices`` (all devices by default).

  ``config.mesh.{data,fsdp,sequence,tensor}`` are the sizes inside one slice (ICI); ``dcn_data``
  and ``dcn_fsdp`` multiply the data / fsdp axes across slices, so the mesh is
  ``(data * dcn_data, fsdp * dcn_fsdp, sequence, tensor)``. CPU and GPU devices are laid out in the order
  given (as ``np.reshape``); TPU devices by their physical coordinates.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = dcn_shape(mesh_cfg)
  slices = math.prod(dcn)
  if slices > 1:
    found = _slice_count(devices)
    if found != slices:
      raise ConfigError(f"config.mesh.dcn_data * dcn_fsdp = {slices} slices, but the devices come from {found} "
                        "slice(s) (tools/aot_compile.py --num_slices plans several)")
  if len(devices) % slices:
    raise ConfigError(f"{len(devices)} devices do not split into {slices} slices")
  ici = mesh_shape(mesh_cfg, len(devices) // slices)
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu" and len(devices) > 1:
    array = _ici_mesh(ici, devices)
  else:
    array = np.asarray(devices).reshape(ici)
  return Mesh(array, MESH_AXES)


def _ici_mesh(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Devices of one TPU slice arranged on the torus: each mesh axis maps onto physical axes."""
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # shapes that do not map onto whole physical axes (e.g. tensor=8 on a 4x4x4 torus)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None):
  """The mesh axes the ``batch`` rule splits rows over (present in ``mesh``; ``None`` if none)."""
  table = dict(reversed(list(rules if rules is not None else default_rules())))  # first rule wins
  target = table.get("batch")
  targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  present = tuple(a for a in targets if a in mesh.axis_names)
  return present or None


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> int:
  axes = batch_axes(mesh, rules)
  return 1 if axes is None else math.prod(mesh.shape[a] for a in axes)


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
  axes, shards = batch_axes(mesh, config.logical_axis_rules), batch_shards(mesh, config.logical_axis_rules)
  if config.data.batch_size % shards:
    errors.append(f"config.data.batch_size={config.data.batch_size} is not divisible by the batch rule's mesh "
                  f"axes {'*'.join(axes)}={shards} (config.logical_axis_rules 'batch')")
  errors += sequence_errors(config, length_shards(mesh, config.logical_axis_rules))
  if errors:
    raise ConfigError("mesh/config mismatch:\n  " + "\n  ".join(errors))


def length_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> tuple[str, ...]:
  """The mesh axes (present, size > 1) the ``length`` rule splits every row over (context parallelism)."""
  table = {}
  for name, target in (rules if rules is not None else default_rules()):
    table.setdefault(name, target)
  target = table.get("length")
  targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return tuple(a for a in targets if mesh.shape.get(a, 1) > 1)


def length_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> int:
  """How many pieces each row's und and gen buffers are cut into (1: whole rows per device)."""
  return math.prod(mesh.shape[a] for a in length_axes(mesh, rules))


def sequence_errors(config: ml_collections.ConfigDict, shards: int) -> list[str]:
  """Row lengths a ``shards``-way context-parallel split needs (both buffers cut evenly)."""
  d, errors = config.data, []
  if shards > 1:
    for name in ("und_len", "gen_len"):
      if d[name] % shards:
        errors.append(f"config.data.{name}={d[name]} is not divisible by the {shards} sequence shards of a row "
                      f"(config.mesh.sequence and the 'length' rule of config.logical_axis_rules)")
  return errors


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


def batch_field_axes(name: str, ndim: int) -> tuple[str | None, ...]:
  """Logical names of a batch field: the und/gen buffers are ``[batch, length, ...]`` (split over the
  ``length`` rule's axes with the activations); ViT patches and the rest ``[batch, ...]``."""
  if name.startswith(("und_", "gen_")):
    return ("batch", "length") + (None,) * (ndim - 2)
  return ("batch",) + (None,) * (ndim - 1)


def batch_shardings(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None,
                    shapes: dict[str, Sequence[int]]) -> dict[str, NamedSharding]:
  """Per-field shardings of a global batch (``shapes``: field -> global shape), from the rules."""
  rules = list(rules if rules is not None else default_rules())
  rows = batch_axes(mesh, rules)
  lengths = length_axes(mesh, rules)
  out = {}
  for name, shape in shapes.items():
    names = batch_field_axes(name, len(shape))
    spec = [rows] + [None] * (len(shape) - 1)
    if len(names) > 1 and names[1] == "length" and lengths:
      spec[1] = lengths[0] if len(lengths) == 1 else lengths
    while len(spec) > 1 and spec[-1] is None:  # P(rows) as batch_sharding gives, not P(rows, None, ...)
      spec.pop()
    out[name] = NamedSharding(mesh, P(*spec))
  return out


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> NamedSharding:
  """Packed rows are split over the ``batch`` rule's mesh axes; every other dim is replicated.

  ``rules`` are ``config.logical_axis_rules`` (the defaults when omitted).
  """
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))
