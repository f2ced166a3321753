"""The two readings of the gen head: BAGEL's velocity, and the clean latent (x0) of the tiny configs."""

import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax import config_validation, losses
from unimage_jax.model import unimage


def _noised(seed=0, shape=(2, 6, 12)):
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal(shape).astype(np.float32)
  eps = rng.standard_normal(shape).astype(np.float32)
  t = rng.uniform(0.0, 1.0, shape[:2]).astype(np.float32)  # [B, Lg]
  return x0, eps, t, (1 - t[..., None]) * x0 + t[..., None] * eps


def test_x0_head_implies_the_flow_velocity():
  x0, eps, t, x_t = _noised()
  v = np.asarray(unimage.flow_velocity(jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t), "x0"))
  ok = t >= unimage.X0_MIN_T
  np.testing.assert_allclose(v[ok], (eps - x0)[ok], atol=1e-4)  # the true x0 gives the true velocity
  assert np.isfinite(v).all() and np.abs(v).max() < 20 / unimage.X0_MIN_T  # t -> 0 stays bounded
  head = np.asarray(jnp.ones_like(x0))
  assert np.array_equal(np.asarray(unimage.flow_velocity(jnp.asarray(head), jnp.asarray(x_t), jnp.asarray(t), "velocity")), head)


def test_loss_space_follows_the_prediction_unless_set(tiny_config):
  m = tiny_config.model
  for pred, loss, want in [("velocity", "auto", "velocity"), ("x0", "auto", "x0"), ("x0", "velocity", "velocity")]:
    m.flow_prediction, m.flow_loss = pred, loss
    assert losses.loss_space(m) == want


def test_x0_loss_is_the_clean_latent_error(tiny_config):
  """With flow_loss=x0 the per-token loss is |x0 - x0_hat|^2: t^2 times the velocity error."""
  x0, eps, t, x_t = _noised(1)
  t = np.maximum(t, unimage.X0_MIN_T)
  x0_hat = x0 + 0.1
  v_hat = np.asarray(unimage.flow_velocity(jnp.asarray(x0_hat), jnp.asarray(x_t), jnp.asarray(t), "x0"))
  err_v = np.mean(np.square(v_hat - (eps - x0)), -1)
  np.testing.assert_allclose(err_v * t**2, np.full_like(t, 0.01), rtol=1e-3)


@pytest.mark.parametrize("field,value", [("flow_prediction", "eps"), ("flow_loss", "noise")])
def test_bad_flow_settings_are_refused(tiny_config, field, value):
  tiny_config.model[field] = value
  with pytest.raises(config_validation.ConfigError, match=f"config.model.{field}='{value}'"):
    config_validation.validate_model_config(tiny_config.model)


class _FixedHead:
  """A stand-in for the model in the loss arithmetic: zero hidden states and a fixed gen head."""

  def __init__(self, head):
    self.head = head

  def __call__(self, batch, x_t, t):
    b, lu = batch["und_token_ids"].shape
    return jnp.zeros((b, lu, 4)), self.head

  def logits(self, h):
    return jnp.zeros(h.shape[:-1] + (8,))


def test_flow_loss_is_the_gen_loss_weighted_mean_over_noised_tokens(tiny_config):
  """``gen_loss_weights`` (``data.character_loss_weight``) weigh each noised token's error; the MSE
  is their weighted mean, clean and padding tokens count nothing, and weight 1 everywhere gives
  the plain mean."""
  from unimage_jax import layout
  rng = np.random.default_rng(3)
  b, lg, d = 2, 6, 12
  kinds = np.array([[layout.KIND_NOISE] * 3 + [layout.KIND_CLEAN] * 2 + [layout.KIND_PAD]] * b, np.int32)
  batch = {"und_token_ids": np.zeros((b, 4), np.int32), "und_labels": np.full((b, 4), layout.IGNORE_LABEL, np.int32),
           "und_loss_weights": np.zeros((b, 4), np.float32),
           "gen_latents": rng.standard_normal((b, lg, d)).astype(np.float32),
           "gen_segment_ids": np.zeros((b, lg), np.int32), "gen_segment_kinds": kinds}
  m = tiny_config.model
  m.flow_prediction, m.flow_loss = "velocity", "auto"
  head = jnp.asarray(rng.standard_normal((b, lg, d)), jnp.float32)
  key = np.asarray([0, 7], np.uint32)

  def mse(weights):
    sums = losses.loss_sums(_FixedHead(head), {**batch, "gen_loss_weights": weights}, key, m, max_segments=4)
    return sums, float(losses.combine(sums, tiny_config.loss)[1]["mse"])

  sums, plain = mse(np.ones((b, lg), np.float32))
  _, _, target, noised = losses.noise_latents(key, batch, 4, m.timestep_shift)
  err = np.mean(np.square(np.asarray(head) - np.asarray(target)), -1)  # [B, Lg]
  np.testing.assert_allclose(plain, err[np.asarray(noised)].mean(), rtol=1e-5)
  assert float(sums.mse_weight) == float(sums.mse_tokens) == 6
  w = rng.uniform(1.0, 10.0, (b, lg)).astype(np.float32)
  sums, weighted = mse(w)
  wn = np.where(np.asarray(noised), w, 0.0)
  np.testing.assert_allclose(weighted, (wn * err).sum() / wn.sum(), rtol=1e-5)
  assert float(sums.mse_tokens) == 6 and float(sums.mse_weight) == pytest.approx(wn.sum(), rel=1e-6)
  assert abs(weighted - plain) > 1e-3
