"""Training losses: next-token CE on text labels and rectified-flow MSE on noised latent tokens.

Both are reported as (sum, count) so that the step can normalise by *global* token counts (across
the data-parallel batch and across gradient-accumulation micro-steps), as BAGEL does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from unimage_jax import layout


class LossSums(NamedTuple):
  ce_sum: jax.Array  # weighted sum of token CE
  ce_weight: jax.Array  # sum of CE weights (the token count when unweighted)
  ce_tokens: jax.Array  # number of label tokens
  mse_sum: jax.Array  # sum over noised tokens of the channel-mean squared error
  mse_tokens: jax.Array  # number of noised latent tokens


def shift_timestep(t: jax.Array, shift: float) -> jax.Array:
  """``shift(t) = s t / (1 + (s - 1) t)``: s > 1 moves mass towards the noisy end."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def loss_space(model_cfg: ml_collections.ConfigDict) -> str:
  """Where the flow MSE is measured: "velocity" (BAGEL) or "x0" (``t^2``-weighted velocity error).

  ``flow_loss="auto"`` follows ``flow_prediction``. An x0-predicting model trained on the
  velocity error weights a sample by ``1/t^2``: the nearly clean samples then dominate the
  gradient and Adam's normalisation starves the noisy ones, which are the samples where the
  picture has to come from the context (README, "Diagnosing the keyframes").
  """
  space = model_cfg.get("flow_loss", "auto")
  return model_cfg.get("flow_prediction", "velocity") if space == "auto" else space


def noise_latents(rng: jax.Array, batch, max_segments: int, shift: float):
  """Draws one t per noised image and the noise; returns (x_t, t per token, velocity target, mask).

  ``t = shift(sigmoid(n))``, ``n ~ N(0, 1)``; ``x_t = (1 - t) x0 + t eps``; target ``eps - x0``.
  Clean latent tokens keep ``x0`` and ``t = 0``.
  """
  x0 = batch["gen_latents"].astype(jnp.float32)  # [B, Lg, Dl]
  b = x0.shape[0]
  t_rng, eps_rng = jax.random.split(rng)
  t_seg = shift_timestep(jax.nn.sigmoid(jax.random.normal(t_rng, (b, max_segments))), shift)  # [B, S]
  seg = jnp.clip(batch["gen_segment_ids"], 0, max_segments - 1)
  noised = batch["gen_segment_kinds"] == layout.KIND_NOISE  # [B, Lg]
  t = jnp.where(noised, jnp.take_along_axis(t_seg, seg, axis=1), 0.0)  # [B, Lg]
  eps = jax.random.normal(eps_rng, x0.shape, jnp.float32)
  x_t = jnp.where(noised[..., None], (1.0 - t[..., None]) * x0 + t[..., None] * eps, x0)
  return x_t, t, eps - x0, noised


def chunked_cross_entropy(hidden, logits_fn, labels, weights, chunk: int):
  """Weighted CE sum without materialising ``[B, L, V]`` logits.

  hidden [B, L, E], labels [B, L] (IGNORE_LABEL = no loss), weights [B, L]. Tokens are processed
  ``chunk`` at a time under ``jax.checkpoint`` so only one ``[chunk, V]`` tile is ever live.
  Returns the weighted CE sum.
  """
  e = hidden.shape[-1]
  h = hidden.reshape(-1, e)
  y = labels.reshape(-1)
  w = jnp.where(y == layout.IGNORE_LABEL, 0.0, weights.reshape(-1).astype(jnp.float32))
  n = h.shape[0]
  chunk = max(1, min(chunk, n))
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, e)
  y = jnp.pad(jnp.maximum(y, 0), (0, pad)).reshape(n_chunks, chunk)
  w = jnp.pad(w, (0, pad)).reshape(n_chunks, chunk)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(args):
    h_c, y_c, w_c = args
    logits = logits_fn(h_c)  # [chunk, V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - target) * w_c)

  return jnp.sum(jax.lax.map(body, (h, y, w)))


def loss_sums(model, batch, rng: jax.Array, model_cfg: ml_collections.ConfigDict, max_segments: int) -> LossSums:
  """Runs the model on a packed batch and returns the un-normalised loss sums and counts."""
  x_t, t, target, noised = noise_latents(rng, batch, max_segments, model_cfg.timestep_shift)
  hidden, velocity = model(batch, x_t, t)
  labels, weights = batch["und_labels"], batch["und_loss_weights"]
  ce_sum = chunked_cross_entropy(hidden, model.logits, labels, weights, model_cfg.ce_chunk)
  per_token = jnp.mean(jnp.square(velocity - target), axis=-1)  # [B, Lg]
  if loss_space(model_cfg) == "x0":  # |x0 - x0_hat|^2 = t^2 |v - v_hat|^2
    per_token = per_token * jnp.square(t)
  has_label = labels != layout.IGNORE_LABEL
  return LossSums(
      ce_sum=ce_sum,
      ce_weight=jnp.sum(jnp.where(has_label, weights, 0.0)),
      ce_tokens=jnp.sum(has_label).astype(jnp.float32),
      mse_sum=jnp.sum(jnp.where(noised, per_token, 0.0)),
      mse_tokens=jnp.sum(noised).astype(jnp.float32),
  )


def combine(sums: LossSums, loss_cfg: ml_collections.ConfigDict, totals: LossSums | None = None):
  """Total loss ``w_ce * CE + w_mse * MSE`` normalised by (global) counts; returns (loss, metrics).

  ``totals`` gives the global normalisers when ``sums`` covers a micro-batch or one shard.
  """
  totals = sums if totals is None else totals
  ce = sums.ce_sum / jnp.maximum(totals.ce_weight, 1e-9)
  mse = sums.mse_sum / jnp.maximum(totals.mse_tokens, 1.0)
  loss = loss_cfg.ce_weight * ce + loss_cfg.mse_weight * mse
  metrics = {"loss": loss, "ce": ce, "mse": mse, "ce_tokens": sums.ce_tokens, "mse_tokens": sums.mse_tokens}
  return loss, metrics


def batch_normalizers(batch) -> LossSums:
  """Global CE weight and noised-token counts, read from the batch metadata before any forward.

  Computed once per step over the whole (global) batch, so micro-batches of gradient
  accumulation and data-parallel shards all divide by the same numbers.
  """
  has_label = batch["und_labels"] != layout.IGNORE_LABEL
  noised = batch["gen_segment_kinds"] == layout.KIND_NOISE
  zero = jnp.zeros((), jnp.float32)
  return LossSums(
      ce_sum=zero,
      ce_weight=jnp.sum(jnp.where(has_label, batch["und_loss_weights"], 0.0)),
      ce_tokens=jnp.sum(has_label).astype(jnp.float32),
      mse_sum=zero,
      mse_tokens=jnp.sum(noised).astype(jnp.float32),
  )
