"""The train state (a pytree) and its shardings, derived from the params' logical axes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimage_jax import sharding
from unimage_jax.model import functional


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any  # pure dict of arrays (param_dtype)
  tables: Any  # fixed sin-cos tables, never updated
  opt_state: Any
  ema: Any  # fp32 copy of params, or None when EMA is off
  skipped: jax.Array  # [] int32: steps skipped for non-finite loss/gradients
  rng: jax.Array  # [2] uint32 base key; the step key is fold_in(rng, step)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, params_shardings, mesh: Mesh):
  """Optimizer leaves that mirror a parameter (Adam mu/nu) take its sharding; others replicate."""
  by_path = {}
  for path, s in jax.tree_util.tree_leaves_with_path(params_shardings):
    by_path[_path_keys(path)] = s
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      s = by_path.get(keys[start:])
      if s is not None and len(s.spec) <= leaf.ndim:
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def abstract_state(config: ml_collections.ConfigDict, mdef: functional.ModelDef,
                   optimizer: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs of the whole train state (no allocation)."""
  params, tables = mdef.abstract_arrays()
  ema = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params) if config.optim.ema_decay > 0 else None
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=params,
      tables=tables,
      opt_state=jax.eval_shape(optimizer.init, params),
      ema=ema,
      skipped=jax.ShapeDtypeStruct((), jnp.int32),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )


def state_shardings(config: ml_collections.ConfigDict, mdef: functional.ModelDef, abstract: TrainState,
                    mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of the train state, from the config's logical-axis rules."""
  rules = config.logical_axis_rules
  p_axes, t_axes = mdef.logical_axes()
  p_sh = sharding.tree_shardings(abstract.params, p_axes, rules, mesh)
  t_sh = sharding.tree_shardings(abstract.tables, t_axes, rules, mesh)
  replicated = NamedSharding(mesh, P())
  return TrainState(
      step=replicated,
      params=p_sh,
      tables=t_sh,
      opt_state=opt_state_shardings(abstract.opt_state, p_sh, mesh),
      ema=p_sh if abstract.ema is not None else None,
      skipped=replicated,
      rng=replicated,
  )


def init_state(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
               shardings: TrainState) -> TrainState:
  """Initialises the state directly into its shardings (each device builds only its shards)."""

  def init():
    params, tables = functional.init_params(config.model, config.train.seed)
    ema = jax.tree.map(lambda p: p.astype(jnp.float32), params) if config.optim.ema_decay > 0 else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        tables=tables,
        opt_state=optimizer.init(params),
        ema=ema,
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(config.train.seed + 1)).astype(jnp.uint32),
    )

  return jax.jit(init, out_shardings=shardings)()
