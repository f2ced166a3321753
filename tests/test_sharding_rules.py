"""Every sharding derives from config.logical_axis_rules: change the rules, the program follows."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimage_jax import sharding, synthetic
from unimage_jax.attention.mesh_context import attention_mesh
from unimage_jax.attention.sharded import kernel_specs
from unimage_jax.model import constraints
from unimage_jax.training import step as step_lib
from unimage_jax.training.train_setup import setup_train

try:
  import libtpu  # noqa: F401
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False


def changed_rules(rules):
  """Heads unsharded (weights and activations), the hidden size over ``tensor`` instead."""
  new = {"heads": None, "kv_heads": None, "act_heads": None, "act_kv_heads": None, "embed": "tensor",
         "act_embed": "tensor"}
  return [(name, new.get(name, target)) for name, target in rules]


def _loss_and_grads(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = setup_train(config, mesh)
  shardings, state = setup.shardings, setup.init_state()
  batch_sharding = sharding.batch_sharding(mesh, config.logical_axis_rules)
  batch = jax.device_put(synthetic.random_batch(config, seed=0), batch_sharding)
  fn = jax.jit(step_lib.make_loss_and_grad(config, setup.model_def),
               in_shardings=(shardings.params, shardings.tables, batch_sharding, None))
  with attention_mesh(mesh, config.logical_axis_rules):
    lowered = fn.lower(state.params, state.tables, batch, jax.random.key(3))
  loss, _, grads = lowered.compile()(state.params, state.tables, batch, jax.random.key(3))
  return float(loss), jax.tree.map(np.asarray, grads), shardings, lowered.as_text()


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_changed_rules_keep_the_8_device_loss_equal_to_1_device(tiny_config, impl):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  c = tiny_config
  c.data.batch_size = 4
  c.model.attention_impl = impl  # pallas_tpu: the kernel in interpret mode, inside shard_map
  if impl != "xla":
    c.model.num_layers = 1
  c.logical_axis_rules = changed_rules(c.logical_axis_rules)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  one, one_grads, _, _ = _loss_and_grads(c, jax.devices()[:1])
  # the kernel in interpret mode under shard_map deadlocks XLA:CPU's 8-device collectives on 2
  # cores; 4 devices (data x tensor) still put the changed heads/embed rules into its specs
  sizes = dict(data=2, fsdp=2, tensor=2) if impl == "xla" else dict(data=2, fsdp=1, tensor=2)
  c.mesh.update(**sizes)
  n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
  eight, eight_grads, shardings, text = _loss_and_grads(c, jax.devices()[:n])
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), eight_grads, one_grads)
  # the parameters follow the new rules: q_proj [layers, embed, heads, head_dim] splits embed over tensor
  q = shardings.params["decoder"]["layers"]["und"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "tensor", None, None)
  # and the activations are constrained: the hidden state [B, L, E] over (data, fsdp) x tensor
  assert "sharding_constraint" in text or "@Sharding" in text
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:n])
  with attention_mesh(mesh, c.logical_axis_rules):
    rows = ("data", "fsdp") if sizes["fsdp"] > 1 else "data"  # size-1 axes drop out of the spec
    assert constraints.spec_for(constraints.HIDDEN, (4, 96, 64)) == P(rows, None, "tensor")
    assert constraints.spec_for(constraints.QUERY, (4, 96, 4, 16)) == P(rows, None, None, None)


def test_the_kernel_specs_and_the_batch_follow_the_rules(tiny_config):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  c = tiny_config
  c.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:8])
  rules = c.logical_axis_rules
  assert kernel_specs((4, 96, 4, 16), rules, mesh) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None))
  assert kernel_specs((4, 96, 4, 16), changed_rules(rules), mesh)[0] == P(("data", "fsdp"), None, None, None)
  only_data = [(n, "data" if n == "batch" else t) for n, t in rules]
  assert sharding.batch_sharding(mesh, only_data).spec == P(("data",))
  assert kernel_specs((4, 96, 4, 16), only_data, mesh)[1] == P("data", None)
  with pytest.raises(ValueError, match="map 'length' and 'head_dim' to None"):
    kernel_specs((4, 96, 4, 16), [("length", "tensor")] + list(rules), mesh)
  c.data.batch_size = 6  # divisible by data=2 (the new batch rule), not by data*fsdp=4
  c.logical_axis_rules = only_data
  sharding.check_mesh_compatible(c, mesh)
  c.logical_axis_rules = rules
  with pytest.raises(Exception, match=r"batch_size=6 is not divisible by the batch rule's mesh axes data\*fsdp=4"):
    sharding.check_mesh_compatible(c, mesh)


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_changed_rules_still_compile_and_fit_ahead_of_time(tiny_config):
  from unimage_jax import aot
  c = tiny_config
  c.data.batch_size = 4
  c.mesh.update(data=1, fsdp=2, tensor=2)
  c.model.attention_impl = "auto"  # the Mosaic kernel, its shard_map specs from the changed rules
  c.model.scan_layers = True  # one kernel call per pass in the scanned body (the tiny CPU config unrolls)
  c.logical_axis_rules = changed_rules(c.logical_axis_rules)
  plan = aot.compile_train_step(c, "v5e:2x2")
  assert plan.fits and plan.attention_impl == "pallas_tpu"
  assert plan.compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
