"""Meshes that follow the hardware: in-order on CPU, ICI-torus-aware on TPU, hybrid across slices."""

import random

import jax
import numpy as np
import pytest

from unimage_jax import aot, sharding
from unimage_jax.config_validation import ConfigError

try:
  import libtpu  # noqa: F401
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")


def _mesh_cfg(tiny_config, **sizes):
  tiny_config.mesh.update(**sizes)
  return tiny_config.mesh


def test_cpu_mesh_is_the_devices_in_order(tiny_config):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  devices = jax.devices()[:8]
  mesh = sharding.make_mesh(_mesh_cfg(tiny_config, data=2, fsdp=2, tensor=2), devices)
  assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
  assert (mesh.devices == np.asarray(devices).reshape(2, 2, 1, 2)).all()


def test_dcn_axes_need_that_many_slices(tiny_config):
  with pytest.raises(ConfigError, match=r"dcn_data \* dcn_fsdp = 2 slices, but the devices come from 1"):
    sharding.make_mesh(_mesh_cfg(tiny_config, data=-1, dcn_data=2), jax.devices()[:2])
  with pytest.raises(ConfigError, match="config.mesh.dcn_fsdp=0 must be >= 1"):
    sharding.make_mesh(_mesh_cfg(tiny_config, dcn_data=1, dcn_fsdp=0), jax.devices()[:1])


def _is_box(coords) -> bool:
  """Whether chip coordinates fill an axis-aligned block exactly (every chip next to the others)."""
  coords = np.asarray(coords)
  lo, hi = coords.min(0), coords.max(0)
  return len({tuple(c) for c in coords}) == len(coords) == int(np.prod(hi - lo + 1))


def _tensor_groups(mesh):
  return [[d.coords for d in mesh.devices[i, j].flat] for i in range(mesh.shape["data"]) for j in range(mesh.shape["fsdp"])]


@needs_libtpu
@pytest.mark.parametrize("sizes", [dict(data=1, fsdp=16, tensor=4), dict(data=2, fsdp=4, tensor=8),
                                   dict(data=4, fsdp=1, tensor=16)])
def test_tensor_groups_are_physical_neighbours_on_v5p(tiny_config, sizes):
  """On a v5p 4x4x4 torus, handed the chips in a random order, each tensor group is a block of
  neighbouring chips (the in-order reshape of the same list is not)."""
  devices = list(aot.topology_devices("v5p:4x4x4"))
  random.Random(0).shuffle(devices)
  mesh = sharding.make_mesh(_mesh_cfg(tiny_config, **sizes), devices)
  assert dict(mesh.shape) == {**sizes, "sequence": 1}
  assert all(_is_box(g) for g in _tensor_groups(mesh))
  naive = np.asarray(devices).reshape(tuple(sizes.values()))
  assert not all(_is_box([d.coords for d in naive[i, j]]) for i in range(naive.shape[0]) for j in range(naive.shape[1]))


@needs_libtpu
def test_train_step_compiles_on_v5p_with_neighbouring_tensor_groups(tiny_config):
  c = tiny_config
  c.data.batch_size = 4
  c.mesh.update(data=1, fsdp=4, tensor=2)
  mesh = sharding.make_mesh(c.mesh, aot.topology_devices("v5p:2x2x2"))
  assert all(_is_box(g) for g in _tensor_groups(mesh))
  plan = aot.compile_train_step(c, "v5p:2x2x2")
  assert plan.mesh == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2} and plan.fits


@needs_libtpu
def test_two_slices_put_data_or_fsdp_across_dcn(tiny_config):
  """2 x v5e 2x2 (8 chips): the DCN axis spans the slices, each ICI block stays in one slice, and
  the compiled step's DCN traffic is the gradient all-reduce (dcn_data) or, larger, the parameter
  gathers and gradient reductions of FSDP across slices (dcn_fsdp)."""
  c = tiny_config
  c.data.batch_size = 8
  c.mesh.update(data=1, fsdp=4, tensor=1, dcn_data=2)
  mesh = sharding.make_mesh(c.mesh, aot.topology_devices("v5e:2x2", num_slices=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
  by_data = aot.compile_train_step(c, "v5e:2x2", num_slices=2)
  assert by_data.num_slices == 2 and by_data.traffic.dcn_bytes > 0
  assert set(by_data.traffic.dcn_by_kind) == {"dcn-all_reduce"}
  c.mesh.update(fsdp=4, dcn_data=1, dcn_fsdp=2)
  by_fsdp = aot.compile_train_step(c, "v5e:2x2", num_slices=2)
  assert by_fsdp.mesh == {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
  assert by_fsdp.traffic.dcn_bytes > by_data.traffic.dcn_bytes
  assert "across slices (DCN)" in aot.report(by_fsdp, c)
  with pytest.raises(ConfigError, match="--num_slices=2 but config.mesh.dcn_data=1 x dcn_fsdp=4"):
    c.mesh.update(dcn_fsdp=4)
    aot.compile_train_step(c, "v5e:2x2", num_slices=2)
