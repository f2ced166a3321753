"""The one train setup: model definition, optimizer, abstract state, shardings and the jitted step.

Why one: the trainer, the ahead-of-time planner (``unimage_jax/aot.py``), ``tools/benchmark.py`` and
the tests must run the same program (the same state and batch shardings, the same donation), so
each of them builds it here rather than repeating the steps. The model definition is built once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from unimage_jax import sharding
from unimage_jax.attention.mesh_context import attention_mesh
from unimage_jax.model import functional
from unimage_jax.training import data_source
from unimage_jax.training import optimizer as opt_lib
from unimage_jax.training import state as state_lib
from unimage_jax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything a run needs before its first step, and nothing that allocates the state."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  model_def: functional.ModelDef
  optimizer: optax.GradientTransformation
  abstract: state_lib.TrainState  # ShapeDtypeStructs of every leaf
  shardings: state_lib.TrainState  # NamedShardings of every leaf
  batch_spec: dict[str, jax.ShapeDtypeStruct]  # the global batch, with its shardings
  step: Callable  # jitted (state, batch) -> (state, metrics); the old state is donated

  @property
  def batch_shardings(self) -> dict[str, NamedSharding]:
    """Field -> the sharding the step takes it in (read off :attr:`batch_spec`)."""
    return _shardings_of(self.batch_spec)

  def state_spec(self) -> state_lib.TrainState:
    """The abstract state with its shardings: lowers the step with no state allocated (AOT)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings)

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, built directly into its shardings."""
    return state_lib.init_state(self.config, self.optimizer, self.shardings)

  def compile(self, state) -> jax.stages.Compiled:
    """The step compiled for ``state`` (arrays or :meth:`state_spec`) and the batch spec; the
    attention kernels see the mesh they run per shard of."""
    with attention_mesh(self.mesh, self.config.logical_axis_rules):
      return self.step.lower(state, self.batch_spec).compile()


def _shardings_of(spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, NamedSharding]:
  return {k: v.sharding for k, v in spec.items()}


def setup_train(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainSetup:
  """Checks the mesh against the config (ConfigError naming the fields) and builds the setup."""
  sharding.check_mesh_compatible(config, mesh)
  mdef = functional.model_def(config.model)
  optimizer = opt_lib.make_optimizer(config, mdef.abstract_arrays()[0])
  abstract = state_lib.abstract_state(config, mdef, optimizer)
  shardings = state_lib.state_shardings(config, mdef, abstract, mesh)
  batch_spec = data_source.batch_spec(config, mesh)
  step = step_lib.jit_train_step(step_lib.make_train_step(config, mdef, optimizer), shardings,
                                 _shardings_of(batch_spec))
  return TrainSetup(config, mesh, mdef, optimizer, abstract, shardings, batch_spec, step)
