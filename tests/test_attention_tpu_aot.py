"""The Mosaic kernel lowers and compiles ahead of time for a real TPU topology on the CPU host,
inside a sharded (shard_map) fwd+bwd step. Needs libtpu (the ``tpu`` extra)."""

import pytest

from unimage_jax.attention import pallas_tpu
from unimage_jax.testing import attention_aot as aot

_OK, _WHY = aot.libtpu_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


@pytest.mark.parametrize("pipeline", pallas_tpu.PIPELINES)
@pytest.mark.parametrize("topology,mesh_shape,heads", [
    ("v5e:2x2", (4, 1, 1), (28, 4)),  # batch-sharded, bagel_7b heads (GQA 7)
    ("v5e:2x2", (1, 2, 2), (8, 2)),  # batch over fsdp, heads over tensor
])
def test_kernel_compiles_for_tpu(topology, mesh_shape, heads, pipeline, monkeypatch):
  monkeypatch.setattr(pallas_tpu, "DEFAULT_PIPELINE", pipeline)
  mesh = aot.topology_mesh(topology, mesh_shape)
  shape = aot.AttentionShape(batch=4, length=2048 + 100, q_heads=heads[0], kv_heads=heads[1])
  compiled = aot.compile_attention_step(mesh, shape, "pallas_tpu", block_q=512, block_k=512)
  assert aot.count_kernels(compiled) == 3  # forward, dQ, dK/dV
  stats = aot.memory_stats(compiled)
  assert stats["argument_bytes"] > 0


def test_kernel_compiles_small_blocks_fp32():
  mesh = aot.topology_mesh("v5e:2x2", (2, 1, 2))
  shape = aot.AttentionShape(batch=2, length=1000, q_heads=4, kv_heads=4, head_dim=64,
                             dtype="float32")
  compiled = aot.compile_attention_step(mesh, shape, "pallas_tpu", block_q=128, block_k=256)
  assert aot.count_kernels(compiled) == 3


def test_kernel_compiles_for_short_rows():
  """Rows shorter than a block use one tile of the lane-aligned length (300 -> 384)."""
  mesh = aot.topology_mesh("v5e:2x2", (4, 1, 1))
  compiled = aot.compile_attention_step(mesh, aot.AttentionShape(4, 300, 8, 2, 128), "pallas_tpu")
  assert aot.count_kernels(compiled) == 3


def test_kernel_compiles_inside_toy_train_step():
  """scan over layers + remat + tensor-sharded projections, as the model will use it."""
  mesh = aot.topology_mesh("v5e:2x2", (2, 1, 2))
  shape = aot.AttentionShape(batch=2, length=1024, q_heads=8, kv_heads=2, head_dim=128)
  compiled = aot.compile_toy_train_step(mesh, shape, "pallas_tpu", layers=2)
  assert aot.count_kernels(compiled) >= 3
