"""Collective traffic read from compiled HLO: payload bytes, loop trip counts, DCN vs ICI."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimage_jax import hlo_analysis

# A hand-written module in the shape of a multi-slice TPU executable: an all-gather inside a scan
# (4 trips, read from the condition), a Megascale DCN send outside, an iota-form all-reduce.
_MODULE = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.7 = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %constant.7), direction=LT
}

%body (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p.1), index=1
  %all-gather.1 = f32[32]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %all-reduce.2 = bf16[16]{0} all-reduce(%a), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %send = (f32[1,128]{1,0}, u32[], token[]) send(%a, %after-all), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[8]{0} copy(%a)
}
"""


def test_hand_written_module():
  found = {c.name: c for c in hlo_analysis.parse_collectives(_MODULE, 8)}
  assert set(found) == {"all-gather.1", "all-reduce.2", "send"}
  gather = found["all-gather.1"]
  assert (gather.kind, gather.payload_bytes, gather.executions) == ("all-gather", 128, 4)
  reduce = found["all-reduce.2"]
  assert reduce.payload_bytes == 32 and reduce.groups == ((0, 4), (1, 5), (2, 6), (3, 7))
  assert found["send"].kind == "dcn-all_reduce" and found["send"].payload_bytes == 512
  slices = [0, 0, 0, 0, 1, 1, 1, 1]
  t = hlo_analysis.traffic(found.values(), slices)
  # the iota all-reduce pairs device i with i + 4 (other slice); the gather stays inside a slice
  assert t.dcn_bytes == 512 + 32 and t.ici_bytes == 4 * 128 and t.dcn_ops == 2
  assert t.dcn_by_kind == {"dcn-all_reduce": 512, "all-reduce": 32}


def test_compiled_cpu_program_counts_loop_trips_and_groups():
  """A real compiled program: a psum over a 2-way axis inside a 5-step loop, on 8 CPU devices."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("across", "inside"))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("across", "inside"), out_specs=P("across", "inside"),
                     check_vma=False)
  def step(x):  # x [1, 256] per device
    def body(_, h):
      return jnp.tanh(jax.lax.psum(h, "across"))
    return jax.lax.fori_loop(0, 5, body, x)

  x = jax.device_put(jnp.ones((2, 1024), jnp.float32), NamedSharding(mesh, P("across", "inside")))
  compiled = jax.jit(step).lower(x).compile()
  collectives = [c for c in hlo_analysis.parse_collectives(compiled.as_text(), 8) if c.executions]
  assert collectives, compiled.as_text()[:2000]
  total = sum(c.payload_bytes * c.executions for c in collectives)
  assert total == 5 * 256 * 4, [(c.kind, c.payload_bytes, c.executions) for c in collectives]
  # partition id p runs on mesh.devices.flat[p]; "slices" = rows of the mesh (the psum's axis)
  slice_of = [i // 4 for i in range(8)]
  assert hlo_analysis.traffic(collectives, slice_of).dcn_bytes == total
  assert hlo_analysis.traffic(collectives, [0] * 8).dcn_bytes == 0
