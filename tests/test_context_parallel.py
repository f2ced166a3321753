"""Context parallelism: rows split over the ``sequence`` mesh axis give the unsplit loss and grads.

The synthetic rows hold several samples each (text, ViT images, noised latents with their clean
copies) and padding in both buffers. 8 host CPU devices run the XLA attentions (the reference and
the block-skipping flash, K/V all-gathered or passed around a ring) in the trainer's loss-and-grad step; the Pallas TPU kernel runs in
interpret mode on 4 devices, attention alone (8 deadlock XLA:CPU's collectives in interpret mode
on 2 cores, and a whole interpret-mode step costs minutes of CI).

CI cost: one micro model (1 layer), its parameters built once on the host and placed on each mesh
(no jitted optimizer init), one unsplit reference step shared by every split mesh.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimage_jax import layout, sharding, synthetic
from unimage_jax.attention.mesh_context import attention_mesh
from unimage_jax.config_loading import load_config
from unimage_jax.config_validation import ConfigError, validate_config
from unimage_jax.model import functional, row_shards
from unimage_jax.training import data_source
from unimage_jax.training import step as step_lib

TOL = dict(rtol=1e-5, atol=1e-6)
ROWS = 4


def _config(impl: str = "xla", strategy: str = "all_gather"):
  c = load_config("tests/micro_config.py")
  c.data.batch_size = ROWS
  c.model.update(num_layers=1, attention_impl=impl, context_parallel=strategy,
                 attention_query_chunk=32)  # the reference walks several query chunks per shard
  return c


@pytest.fixture(scope="module")
def model_inputs():
  """Host (params, tables, batch) of the micro model, shared by every mesh of this module."""
  c = _config()
  params, tables = jax.tree.map(np.asarray, functional.init_params(c.model, 0))
  batch = synthetic.random_batch(c, seed=0)
  # the rows exercise what a split could get wrong: several samples, every kind, padding
  assert batch["und_sample_ids"].max(axis=1).min() >= 1  # ids from 0, padding -1
  assert {layout.KIND_PAD, layout.KIND_TEXT, layout.KIND_VIT} <= set(np.unique(batch["und_segment_kinds"]))
  assert {layout.KIND_PAD, layout.KIND_CLEAN, layout.KIND_NOISE} <= set(np.unique(batch["gen_segment_kinds"]))
  return params, tables, batch


def _loss_and_grads(config, devices, model_inputs):
  params, tables, host_batch = model_inputs
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_mesh_compatible(config, mesh)
  mdef = functional.model_def(config.model)
  p_axes, t_axes = mdef.logical_axes()
  rules = config.logical_axis_rules
  p_sh = sharding.tree_shardings(params, p_axes, rules, mesh)
  t_sh = sharding.tree_shardings(tables, t_axes, rules, mesh)
  params, tables = jax.device_put(params, p_sh), jax.device_put(tables, t_sh)
  batch = data_source.to_global_arrays(host_batch, mesh, config.data.batch_size, rules)
  fn = jax.jit(step_lib.make_loss_and_grad(config, mdef),
               in_shardings=(p_sh, t_sh, {k: v.sharding for k, v in batch.items()}, None))
  with attention_mesh(mesh, rules):
    lowered = fn.lower(params, tables, batch, jax.random.key(3))
  compiled = lowered.compile()
  loss, metrics, grads = compiled(params, tables, batch, jax.random.key(3))
  return float(loss), float(metrics["mse"]), jax.tree.map(np.asarray, grads), batch, compiled


@pytest.fixture(scope="module")
def unsplit(model_inputs):
  """The 1-device step with the reference attention: the oracle for every split mesh."""
  c = _config("xla")
  c.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
  return _loss_and_grads(c, jax.devices()[:1], model_inputs)[:3]


def _assert_same(split, unsplit):
  loss, mse, grads = split[:3]
  np.testing.assert_allclose(loss, unsplit[0], **TOL)
  np.testing.assert_allclose(mse, unsplit[1], **TOL)
  assert mse > 0
  flat, ref = jax.tree.leaves(grads), jax.tree.leaves(unsplit[2])
  assert len(flat) == len(ref)
  for g, r in zip(flat, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * max(1.0, float(np.max(np.abs(r)))))


@pytest.mark.parametrize("impl,mesh,strategy", [
    ("xla", dict(data=2, fsdp=1, sequence=4, tensor=1), "all_gather"),  # 24 und + 12 gen slots per shard
    ("xla_flash", dict(data=1, fsdp=2, sequence=2, tensor=2), "all_gather"),  # heads over tensor inside the shard_map
    # K/V blocks passed around 4 shards (3 rotations, dK/dV home after the 4th; with 2 shards
    # i -> i + 1 and i -> i - 1 coincide, so a ring turning the wrong way would pass)
    ("xla_flash", dict(data=1, fsdp=2, sequence=4, tensor=1), "ring"),
], ids=["xla-data2-seq4", "xla_flash-fsdp2-seq2-tensor2", "ring-xla_flash-fsdp2-seq4"])
def test_sequence_split_rows_give_the_unsplit_loss_and_grads(model_inputs, unsplit, impl, mesh, strategy):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  c = _config(impl, strategy)
  c.mesh.update(**mesh)
  validate_config(c)
  split = _loss_and_grads(c, jax.devices()[:8], model_inputs)
  batch = split[3]
  # the strategy asked for is what ran: the ring's ppermutes (op names in the HLO metadata; the
  # partitioner's own collective-permutes are in both steps), none in the all-gather step
  assert ("ppermute" in split[4].as_text()) == (strategy == "ring")
  seq = mesh["sequence"]
  rows = sharding.batch_axes(sharding.make_mesh(c.mesh, jax.devices()[:8]), c.logical_axis_rules)
  # the data's global arrays follow the axis: the und/gen buffers split over sequence, ViT not
  assert batch["und_token_ids"].sharding.spec == P(rows, "sequence")
  assert batch["gen_latents"].sharding.spec == P(rows, "sequence")
  assert batch["vit_patches"].sharding.spec == P(rows)
  assert batch["und_token_ids"].addressable_shards[0].data.shape == (ROWS // (8 // seq // mesh["tensor"]), 96 // seq)
  _assert_same(split, unsplit)


@pytest.fixture(scope="module")
def attention_case():
  """One shuffled-slot attention problem on 4 sequence shards and its whole-row reference."""
  from jax.sharding import Mesh
  from unimage_jax.testing import layouts
  from unimage_jax.testing.attention_aot import CP_AXES
  from unimage_jax.attention.reference import reference_attention
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 4, 1), CP_AXES)
  rng = np.random.default_rng(0)
  meta = layouts.random_batch_meta(rng, 2, 80, 48, shuffle=True)  # L = 128: 32 slots per shard
  q = jnp.asarray(rng.standard_normal((2, 128, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 128, 2, 16)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((2, 128, 4, 16)), jnp.float32)
  ref = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, meta), w, q, k, v)
  return mesh, meta, (q, k, v), w, ref


def _value_and_grads(fn, w, q, k, v):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("strategy,impl", [
    ("ring", "xla_flash"), ("all_gather", "xla_flash"), ("all_gather", "xla"),
    ("all_gather", "pallas_tpu"),  # interpret mode: queries padded to the gathered row
])
def test_cp_attention_equals_the_unsplit_reference(attention_case, strategy, impl):
  """Attention alone, 4 sequence shards: values and dq/dk/dv against the whole-row reference."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 host devices")
  from unimage_jax.attention.context_parallel import context_parallel_attention
  mesh, meta, qkv, w, (ref_val, ref_grads) = attention_case
  # the Pallas kernel in interpret mode: 32-slot tiles (4 x 4 per row; each shard's 32 queries
  # padded to 128) keep its grid, and so its CPU time, small
  kw = {"xla": dict(query_chunk=16), "xla_flash": dict(block_q=16, block_k=16),
        "pallas_tpu": dict(block_q=32, block_k=32)}[impl]
  cp = lambda q, k, v: context_parallel_attention(q, k, v, meta, mesh=mesh, impl=impl, rules=sharding.default_rules(),
                                                  strategy=strategy, **kw)
  val, grads = _value_and_grads(cp, w, *qkv)
  np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_join_and_split_are_inverse_and_local_to_each_shard():
  und, gen = np.arange(2 * 12).reshape(2, 12), 100 + np.arange(2 * 8).reshape(2, 8)
  joined = np.asarray(row_shards.join(und, gen, 4))
  # shard i (5 slots) = its 3 und slots then its 2 gen slots
  assert joined[0, :5].tolist() == [0, 1, 2, 100, 101] and joined[0, 5:10].tolist() == [3, 4, 5, 102, 103]
  u, g = row_shards.split(joined, 12, 4)
  assert (np.asarray(u) == und).all() and (np.asarray(g) == gen).all()
  assert (np.asarray(row_shards.join(und, gen, 1)) == np.concatenate([und, gen], 1)).all()
  assert sorted(row_shards.join_slots(12, 8, 4).tolist()) == list(range(20))


def test_bad_sequence_configs_are_refused_before_compiling(tiny_config):
  c = tiny_config
  c.mesh.update(data=1, sequence=5)
  with pytest.raises(ConfigError, match=r"config.data.und_len=96 is not divisible by the 5 sequence shards"):
    validate_config(c)
  c.mesh.sequence = 2
  c.data.gen_len = 47
  with pytest.raises(ConfigError, match=r"config.data.gen_len=47 is not divisible"):
    validate_config(c)
  c.data.gen_len = 48
  c.logical_axis_rules = [(n, None if n == "length" else t) for n, t in c.logical_axis_rules]
  with pytest.raises(ConfigError, match=r"config.mesh.sequence=2 but config.logical_axis_rules map 'length'"):
    validate_config(c)
  c.mesh.sequence = 0
  with pytest.raises(ConfigError, match=r"config.mesh.sequence=0 must be positive"):
    validate_config(c)


_HLO_SHAPE = re.compile(r"\b(?:pred|bf16|[fsuc]\d+)\[(\d+(?:,\d+)*)\]")  # f32[2,144,4,16]{...}


def _hlo_shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(map(int, m.split(","))) for m in _HLO_SHAPE.findall(text)]


def _quadratic_shapes(text: str, length: int) -> set[tuple[int, ...]]:
  """Array shapes in HLO text with two dimensions of at least ``length``: an ``L x L`` buffer
  (a mask, scores), fused or not (a fusion's computation lists its inner shapes too)."""
  return {s for s in _hlo_shapes(text) if sum(d >= length for d in s) >= 2}


def test_the_context_parallel_step_compiles_for_tpu_ahead_of_time(tiny_config):
  """The trainer's step with rows split over sequence=2 on v5e 2x2: the Mosaic kernel per shard
  against the gathered K/V (fwd, dQ, dK/dV in the scanned layer), the batch split over sequence."""
  pytest.importorskip("libtpu")
  from unimage_jax import aot
  c = tiny_config
  c.data.batch_size = 2
  c.mesh.update(data=2, fsdp=1, sequence=2, tensor=1)
  c.model.attention_impl = "auto"
  c.model.update(scan_layers=True, num_layers=1)  # one scanned layer: the kernels once, the compile short
  plan = aot.compile_train_step(c, "v5e:2x2")
  assert plan.fits and plan.attention_impl == "pallas_tpu" and plan.mesh["sequence"] == 2
  text = plan.compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 3
  assert "all-gather" in text and "reduce-scatter" in text
  # no L x L tensor in the compiled step, though the whole row's K/V is there (gathered)
  length = c.data.und_len + c.data.gen_len
  assert any(length in s for s in _hlo_shapes(text))
  assert not _quadratic_shapes(text, length)
  # ... which the check would see: an L x L mask compiled into one fused reduction on this host
  x = jnp.zeros(length)
  masked = jax.jit(lambda x: jnp.sum(jnp.where(x[:, None] < x[None, :], x[None, :], 0.0), 1)).lower(x).compile()
  assert (length, length) in _quadratic_shapes(masked.as_text(), length)
