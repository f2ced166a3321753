"""Ahead-of-time TPU compilation of the attention step on a CPU host (libtpu, no TPU needed).

Used by ``tests/test_attention_tpu_aot.py`` and ``tools/attention_memory.py``: builds a mesh over
the devices of a TPU topology description (``topology_devices`` of ``unimage_jax/aot.py``), and
lowers and compiles ``value_and_grad(sum(attention(q, k, v, meta)))`` through the shard_map
wrapper, with the batch and head shardings of the default ``logical_axis_rules`` (batch over
("data", "fsdp"), heads over "tensor").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimage_jax.attention.sharded import kernel_specs, sharded_attention
from unimage_jax.choices import XLA_ATTENTION_IMPLS
from unimage_jax.sharding import batch_axes as _batch_axes, default_rules
from unimage_jax.layout import TokenMeta


def libtpu_available() -> tuple[bool, str]:
  """Whether libtpu can be imported (the ``tpu`` extra), with a reason when it cannot."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    return False, f"libtpu is not installed (pip install -e '.[tpu]'): {e}"
  return True, ""


def topology_mesh(topology: str = "v5e:2x2", shape=None,
                  axes=("data", "fsdp", "tensor")) -> Mesh:
  """A Mesh over the devices of a TPU topology description (no TPU attached)."""
  from unimage_jax.aot import topology_devices  # the trainer's planner: heavy imports
  devices = np.array(topology_devices(topology))
  shape = shape or (devices.size, 1, 1)
  return Mesh(devices.reshape(shape), axes)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  batch: int  # global batch (rows)
  length: int
  q_heads: int = 28
  kv_heads: int = 4
  head_dim: int = 128
  dtype: str = "bfloat16"


def _abstract_inputs(mesh: Mesh, shape: AttentionShape, act, meta_spec):
  """Sharded abstract q, k, v [B, L, H, D] and metadata [B, L] of one attention step."""
  b, l = shape.batch, shape.length
  sh = lambda spec: NamedSharding(mesh, spec)
  dt = jnp.dtype(shape.dtype)
  return (
      jax.ShapeDtypeStruct((b, l, shape.q_heads, shape.head_dim), dt, sharding=sh(act)),
      jax.ShapeDtypeStruct((b, l, shape.kv_heads, shape.head_dim), dt, sharding=sh(act)),
      jax.ShapeDtypeStruct((b, l, shape.kv_heads, shape.head_dim), dt, sharding=sh(act)),
      TokenMeta(*[jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=sh(meta_spec))] * 4),
  )


def compile_attention_step(mesh: Mesh, shape: AttentionShape, impl: str, **attention_kwargs):
  """Lowers and compiles the sharded fwd+bwd attention step; returns the Compiled object."""
  b, l = shape.batch, shape.length
  act, meta_spec = kernel_specs((b, l, shape.q_heads, shape.head_dim), default_rules(), mesh)
  args = _abstract_inputs(mesh, shape, act, meta_spec)

  def step(q, k, v, meta):
    def loss(q, k, v):
      out = sharded_attention(q, k, v, meta, mesh=mesh, impl=impl, interpret=False,
                              **attention_kwargs)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

  return jax.jit(step).lower(*args).compile()


CP_AXES = ("data", "fsdp", "sequence", "tensor")


def compile_cp_attention_step(mesh: Mesh, shape: AttentionShape, impl: str, strategy: str = "all_gather",
                              **attention_kwargs):
  """The fwd+bwd attention step with rows split over ``mesh``'s ``sequence`` axis (context
  parallelism, K/V all-gathered: ``context_parallel.py``); ``mesh`` has axes :data:`CP_AXES`."""
  from unimage_jax.attention.context_parallel import context_parallel_attention, cp_specs
  b, l = shape.batch, shape.length
  act, meta_spec = cp_specs((b, l, shape.q_heads, shape.head_dim), default_rules(), mesh)
  args = _abstract_inputs(mesh, shape, act, meta_spec)

  if impl not in XLA_ATTENTION_IMPLS:
    attention_kwargs = dict(attention_kwargs, interpret=False)  # the real kernel for the TPU target

  def step(q, k, v, meta):
    def loss(q, k, v):
      out = context_parallel_attention(q, k, v, meta, mesh=mesh, impl=impl, rules=default_rules(),
                                       strategy=strategy, **attention_kwargs)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

  return jax.jit(step).lower(*args).compile()


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }


def count_kernels(compiled) -> int:
  """Number of Mosaic custom calls in the compiled HLO (3 = fwd, dQ, dK/dV)."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def compile_toy_train_step(mesh: Mesh, shape: AttentionShape, impl: str, layers: int = 2,
                           embed: int = 256, **attention_kwargs):
  """A toy decoder train step (value_and_grad over stacked per-layer q/k/v/o projections,
  ``lax.scan`` over layers with ``jax.checkpoint``, params sharded over "tensor", batch over
  ("data", "fsdp")) with the sharded attention inside; returns the Compiled object. Checks that
  the kernel composes with scan, remat and sharded parameters the way the model uses it."""
  batch_axes = _batch_axes(mesh, default_rules())
  sh = lambda spec: NamedSharding(mesh, spec)
  dt = jnp.dtype(shape.dtype)
  b, l, hq, hkv, d = shape.batch, shape.length, shape.q_heads, shape.kv_heads, shape.head_dim
  params = {
      "wq": jax.ShapeDtypeStruct((layers, embed, hq * d), dt, sharding=sh(P(None, None, "tensor"))),
      "wk": jax.ShapeDtypeStruct((layers, embed, hkv * d), dt, sharding=sh(P())),
      "wv": jax.ShapeDtypeStruct((layers, embed, hkv * d), dt, sharding=sh(P())),
      "wo": jax.ShapeDtypeStruct((layers, hq * d, embed), dt, sharding=sh(P(None, "tensor", None))),
  }
  x = jax.ShapeDtypeStruct((b, l, embed), dt, sharding=sh(P(batch_axes, None, None)))
  meta = TokenMeta(*[jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=sh(P(batch_axes, None)))] * 4)

  def loss_fn(params, x, meta):
    @jax.checkpoint
    def layer(h, p):
      q = (h @ p["wq"]).reshape(b, l, hq, d)
      k = (h @ p["wk"]).reshape(b, l, hkv, d)
      v = (h @ p["wv"]).reshape(b, l, hkv, d)
      a = sharded_attention(q, k, v, meta, mesh=mesh, impl=impl, interpret=False,
                            **attention_kwargs)
      return h + a.reshape(b, l, hq * d) @ p["wo"], None

    h, _ = jax.lax.scan(layer, x, params)
    return jnp.mean(jnp.square(h.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss_fn))
  return step.lower(params, x, meta).compile()
