"""The jitted train step: gradient accumulation, global-count loss normalisation, non-finite guard.

Everything stays on device: the step returns metrics as arrays and the loop fetches them only at
logging intervals. A non-finite loss or gradient norm leaves params and optimizer state unchanged
and increments ``state.skipped`` (``train.nonfinite='skip'``); ``'stop'`` is enforced by the loop.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimage_jax import losses
from unimage_jax.model.functional import ModelDef
from unimage_jax.training.optimizer import group_labels, update_ema
from unimage_jax.training.state import TrainState


def _micro_batches(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...], micro-batch i = rows i, i+accum, ... (spread over shards)."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _routed_grad_fn(config: ml_collections.ConfigDict, mdef: ModelDef, routes: dict[str, tuple[str, ...]]):
  """Per-loss parameter groups (stage 2, "disentangled expert learning").

  The CE gradient reaches only ``routes['ce']`` groups and the flow gradient only ``routes['mse']``
  groups, e.g. script writing trains the und expert and keyframe generation the gen expert even
  though both share the joint attention. One forward pass, two cotangents through one VJP.
  """

  def parts(params, tables, micro, rng, totals):
    model = mdef.bind(params, tables)
    sums = losses.loss_sums(model, micro, rng, config.model, config.data.max_segments)
    _, metrics = losses.combine(sums, config.loss, totals)
    return (config.loss.ce_weight * metrics["ce"], config.loss.mse_weight * metrics["mse"]), sums

  def grad_fn(params, tables, micro, rng, totals):
    (ce, mse), vjp, sums = jax.vjp(lambda p: parts(p, tables, micro, rng, totals), params, has_aux=True)
    one, zero = jnp.ones_like(ce), jnp.zeros_like(ce)
    (g_ce,), (g_mse,) = vjp((one, zero)), vjp((zero, one))
    labels = group_labels(params)
    pick = lambda g, lab, name: g if lab in routes.get(name, ()) else jnp.zeros_like(g)
    grads = jax.tree.map(lambda gc, gm, lab: pick(gc, lab, "ce") + pick(gm, lab, "mse"), g_ce, g_mse, labels)
    return (ce + mse, sums), grads

  return grad_fn


def make_loss_and_grad(config: ml_collections.ConfigDict, mdef: ModelDef) -> Callable:
  """(params, tables, batch, rng) -> (loss, metrics, grads), accumulating over micro-batches."""
  accum = config.train.grad_accum_steps

  def loss_fn(params, tables, micro, rng, totals):
    model = mdef.bind(params, tables)
    sums = losses.loss_sums(model, micro, rng, config.model, config.data.max_segments)
    loss, _ = losses.combine(sums, config.loss, totals)
    return loss, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  routes = {k: tuple(v) for k, v in config.optim.loss_groups.items()}
  if routes:
    grad_fn = _routed_grad_fn(config, mdef, routes)

  def loss_and_grad(params, tables, batch, rng):
    totals = losses.batch_normalizers(batch)
    if accum == 1:
      (loss, sums), grads = grad_fn(params, tables, batch, rng, totals)
    else:
      def body(carry, xs):
        micro, i = xs
        (loss, sums), grads = grad_fn(params, tables, micro, jax.random.fold_in(rng, i), totals)
        acc_loss, acc_sums, acc_grads = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_sums, sums), acc_grads), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zero_sums = jax.tree.map(jnp.zeros_like, totals)
      (loss, sums, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zero_sums, zeros),
          (_micro_batches(batch, accum), jnp.arange(accum)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    _, metrics = losses.combine(sums, config.loss, totals)
    return loss, metrics, grads

  return loss_and_grad


def make_train_step(config: ml_collections.ConfigDict, mdef: ModelDef,
                    optimizer: optax.GradientTransformation) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  loss_and_grad = make_loss_and_grad(config, mdef)
  ema_decay = float(config.optim.ema_decay)
  skip_nonfinite = config.train.nonfinite == "skip"

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads = loss_and_grad(state.params, state.tables, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = finite if skip_nonfinite else jnp.ones((), bool)
    pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)
    params = pick(params, state.params)
    opt_state = pick(opt_state, state.opt_state)
    ema = state.ema
    if ema is not None:
      ema = pick(update_ema(ema, params, ema_decay), ema)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite, skipped=new_state.skipped)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings: TrainState, batch_shardings):
  """jit with explicit in/out shardings; the old state's buffers are donated to the new one."""
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,),
  )
