"""The train step: overfitting a fixed batch, sharding equivalence, accumulation, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax import sharding, synthetic
from unimage_jax.training import step as step_lib
from unimage_jax.training.train_setup import setup_train


def _setup(config, devices):
  """The trainer's setup on ``devices``, a fresh state and a random batch in the step's shardings."""
  setup = setup_train(config, sharding.make_mesh(config.mesh, devices))
  batch = synthetic.random_batch(config, seed=0)
  return setup, setup.init_state(), jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, setup.batch_shardings)


def test_overfits_fixed_batch_both_losses_fall(tiny_config):
  c = tiny_config
  c.optim.update(learning_rate=3e-3, warmup_steps=5, ema_decay=0.99)
  c.model.timestep_shift = 3.0  # the step's mechanics, not the recipe: most t low enough to fit in 40 steps
  c.train.steps = 40
  setup, state, batch = _setup(c, jax.devices()[:1])
  history = []
  for _ in range(40):
    state, metrics = setup.step(state, batch)
    history.append({k: float(metrics[k]) for k in ("ce", "mse")})
  first, last = history[0], history[-1]
  assert last["ce"] < 0.5 * first["ce"], history
  assert last["mse"] < 0.85 * first["mse"], history
  assert int(state.step) == 40 and int(state.skipped) == 0
  # EMA moved towards the trained params but lags them
  p, e = state.params["lm_head"]["kernel"], state.ema["lm_head"]["kernel"]
  assert not np.allclose(np.asarray(p), np.asarray(e))


def test_sharded_step_matches_single_device(tiny_config):
  """data 2 x fsdp 2 x tensor 2 on 8 CPU devices vs 1 device: loss and grads to 1e-5 (fp32)."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  c = tiny_config
  c.data.batch_size = 4
  results = []
  for devices, mesh_cfg in ((jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)),
                            (jax.devices()[:8], dict(data=2, fsdp=2, tensor=2))):
    c.mesh.update(**mesh_cfg)
    setup, state, batch = _setup(c, devices)
    shardings = setup.shardings
    fn = jax.jit(step_lib.make_loss_and_grad(c, setup.model_def),
                 in_shardings=(shardings.params, shardings.tables, setup.batch_shardings, None),
                 out_shardings=(None, None, shardings.params))
    loss, metrics, grads = fn(state.params, state.tables, batch, jax.random.key(3))
    if len(devices) == 8:  # the params really are split over the mesh
      q = grads["decoder"]["layers"]["und"]["self_attn"]["q_proj"]["kernel"]
      assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1:] != q.shape[1:]
    results.append((float(loss), jax.tree.map(np.asarray, grads)))
  (l1, g1), (l8, g8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g1, g8)


def test_gradient_accumulation_matches_full_batch(tiny_config):
  c = tiny_config
  c.data.batch_size = 4
  setup, state, batch = _setup(c, jax.devices()[:1])
  outs = []
  for accum in (1, 2):
    c.train.grad_accum_steps = accum
    fn = jax.jit(step_lib.make_loss_and_grad(c, setup.model_def))
    # same noise per micro-batch is not expected; compare at a fixed timestep-free quantity: CE part
    c.loss.mse_weight = 0.0
    loss, metrics, grads = fn(state.params, state.tables, batch, jax.random.key(0))
    outs.append((float(loss), grads))
    c.loss.mse_weight = 1.0
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), outs[0][1], outs[1][1])


def test_nonfinite_step_is_skipped_and_counted(tiny_config):
  c = tiny_config
  setup, state, batch = _setup(c, jax.devices()[:1])
  batch = dict(batch)
  batch["gen_latents"] = batch["gen_latents"].at[0, 0, 0].set(jnp.nan)
  step = jax.jit(step_lib.make_train_step(c, setup.model_def, setup.optimizer))
  before = np.asarray(state.params["lm_head"]["kernel"])
  new_state, metrics = step(state, batch)
  assert not bool(metrics["finite"]) and int(new_state.skipped) == 1 and int(new_state.step) == 1
  np.testing.assert_array_equal(np.asarray(new_state.params["lm_head"]["kernel"]), before)


def test_stage2_routes_each_loss_to_its_expert(tiny_config):
  """CE grads reach only the und side, flow grads only the gen side (one forward, two VJPs)."""
  from unimage_jax.config_base import apply_stage
  c = apply_stage(tiny_config, "stage2")
  c.data.update(und_len=96, gen_len=48)
  setup, state, batch = _setup(c, jax.devices()[:1])
  mdef = setup.model_def
  params = dict(state.params)  # a trained llm2vae (it is zero at init, which blocks the flow gradient)
  params["llm2vae"] = {"kernel": jax.random.normal(jax.random.key(1), params["llm2vae"]["kernel"].shape) * 0.1,
                       "bias": params["llm2vae"]["bias"]}
  state = state.replace(params=params)
  routed = jax.jit(step_lib.make_loss_and_grad(c, mdef))(state.params, state.tables, batch, jax.random.key(0))[2]
  grads = {}
  for name, weights in (("ce", (1.0, 0.0)), ("mse", (0.0, 1.0))):
    c.optim.loss_groups = {}
    c.loss.update(ce_weight=weights[0], mse_weight=weights[1])
    grads[name] = jax.jit(step_lib.make_loss_and_grad(c, mdef))(state.params, state.tables, batch, jax.random.key(0))[2]
  und = lambda g: g["decoder"]["layers"]["und"]["mlp"]["up_proj"]["kernel"]
  gen = lambda g: g["decoder"]["layers"]["gen"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_allclose(und(routed), und(grads["ce"]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gen(routed), gen(grads["mse"]), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(und(grads["mse"])).max()) > 0  # without routing the flow loss does reach und
  np.testing.assert_allclose(routed["vae2llm"]["kernel"], grads["mse"]["vae2llm"]["kernel"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(routed["lm_head"]["kernel"], grads["ce"]["lm_head"]["kernel"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_sharded_step_with_the_kernel_matches_the_reference(tiny_config, impl):
  """The model's joint attention through the Pallas kernel (interpret mode, per shard under the mesh)."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 host devices")
  from unimage_jax.attention.mesh_context import attention_mesh
  c = tiny_config
  c.data.batch_size = 4
  c.model.num_layers = 1
  c.mesh.update(data=2, fsdp=1, tensor=2)
  out = {}
  for name in ("xla", impl):
    c.model.attention_impl = name
    setup, state, batch = _setup(c, jax.devices()[:4])
    fn = jax.jit(step_lib.make_loss_and_grad(c, setup.model_def))
    with attention_mesh(setup.mesh):
      loss, _, grads = fn(state.params, state.tables, batch, jax.random.key(0))
    out[name] = (float(loss), jax.tree.map(np.asarray, grads))
  np.testing.assert_allclose(out[impl][0], out["xla"][0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), out[impl][1], out["xla"][1])
