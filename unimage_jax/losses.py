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
from unimage_jax.attention import mesh_context
from unimage_jax.config_validation import flow_prediction
from unimage_jax.model import constraints


class LossSums(NamedTuple):
  ce_sum: jax.Array  # weighted sum of token CE
  ce_weight: jax.Array  # sum of CE weights (the token count when unweighted)
  ce_tokens: jax.Array  # number of label tokens
  mse_sum: jax.Array  # weighted sum over noised tokens of the channel-mean squared error
  mse_weight: jax.Array  # sum of flow-loss weights (the noised token count when unweighted)
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
  return flow_prediction(model_cfg) if space == "auto" else space


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

  hidden [B, L, E], labels [B, L] (IGNORE_LABEL = no loss), weights [B, L]. Each row is cut into
  chunks along its length and one chunk of every row is processed at a time under
  ``jax.checkpoint``, so only a ``[B, c, V]`` tile is live; the batch axis stays whole, so the
  tile keeps the rows' sharding (``batch`` rule) and ``act_vocab`` shards its vocabulary. ``chunk``
  is the tile's tokens *per device*: ``c = chunk / rows per device``. Under context parallelism
  (rows split over the ``length`` rule's axes) a tile takes ``c`` slots of every shard, so it keeps
  the length sharding too. Returns the weighted CE sum.
  """
  b, l, e = hidden.shape
  rows_per_device = max(1, b // _batch_shards())
  shards = _length_shards(l)  # context parallelism: each device holds l / shards of every row
  local = l // shards
  c = max(1, min(chunk // rows_per_device, local))
  n_chunks = -(-local // c)
  pad = n_chunks * c - local
  w = jnp.where(labels == layout.IGNORE_LABEL, 0.0, weights.astype(jnp.float32))

  def split(x):  # [B, l, ...] -> [n, B, shards * c, ...]: chunk i takes c slots of every shard
    x = x.reshape(b, shards, local, *x.shape[2:])
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
    x = jnp.moveaxis(x.reshape(b, shards, n_chunks, c, *x.shape[3:]), 2, 0)
    return x.reshape(n_chunks, b, shards * c, *x.shape[4:])

  h, y, w = split(hidden), split(jnp.maximum(labels, 0)), split(w)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(args):
    h_c, y_c, w_c = args  # [B, c, E], [B, c], [B, c]
    h_c = constraints.constrain(h_c, constraints.HIDDEN)
    logits = constraints.constrain(logits_fn(h_c), constraints.LOGITS)  # [B, c, V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target) * w_c)

  return jnp.sum(jax.lax.map(body, (h, y, w)))


def _length_shards(length: int) -> int:
  """Pieces the rows' length is split into in the step being traced (context parallelism)."""
  mesh = mesh_context.current_mesh()
  if mesh is None:
    return 1
  from unimage_jax.sharding import length_shards
  s = length_shards(mesh, mesh_context.current_rules())
  return s if length % s == 0 else 1


def _batch_shards() -> int:
  """Devices the rows are split over in the step being traced (1 outside a sharded trace)."""
  mesh = mesh_context.current_mesh()
  if mesh is None:
    return 1
  from unimage_jax.sharding import batch_shards
  return batch_shards(mesh, mesh_context.current_rules())


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
  flow_weights = _flow_weights(batch, noised)
  return LossSums(
      ce_sum=ce_sum,
      ce_weight=jnp.sum(jnp.where(has_label, weights, 0.0)),
      ce_tokens=jnp.sum(has_label).astype(jnp.float32),
      mse_sum=jnp.sum(jnp.where(noised, per_token * flow_weights, 0.0)),
      mse_weight=jnp.sum(flow_weights),
      mse_tokens=jnp.sum(noised).astype(jnp.float32),
  )


def _flow_weights(batch, noised: jax.Array) -> jax.Array:
  """[B, Lg] flow-loss weight per latent token: ``gen_loss_weights`` on noised tokens, 0 elsewhere."""
  return jnp.where(noised, batch["gen_loss_weights"].astype(jnp.float32), 0.0)


def combine(sums: LossSums, loss_cfg: ml_collections.ConfigDict, totals: LossSums | None = None):
  """Total loss ``w_ce * CE + w_mse * MSE`` normalised by (global) counts; returns (loss, metrics).

  ``totals`` gives the global normalisers when ``sums`` covers a micro-batch or one shard.
  """
  totals = sums if totals is None else totals
  ce = sums.ce_sum / jnp.maximum(totals.ce_weight, 1e-9)
  mse = sums.mse_sum / jnp.maximum(totals.mse_weight, 1e-9)
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
      mse_weight=jnp.sum(_flow_weights(batch, noised)),
      mse_tokens=jnp.sum(noised).astype(jnp.float32),
  )
