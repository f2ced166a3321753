"""Functional view of the NNX model: pure-dict params for jit, Orbax, optax and export.

Why pure dicts: plain nested dicts of arrays are what checkpoints, optimizers, sharding trees and
the PyTorch exporter all understand, independent of Flax's Variable classes. ``bind`` rebuilds the
NNX module from them inside a traced function at zero cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unimage_jax.config_validation import validate_model_config
from unimage_jax.model.unimage import FixedTable, UniMAGE

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static structure of a model: its graph, and abstract states of params and fixed tables."""

  graphdef: Any
  abstract_params: nnx.State
  abstract_tables: nnx.State

  def bind(self, params: PyTree, tables: PyTree) -> UniMAGE:
    """Pure-dict params/tables -> a usable UniMAGE module (works on tracers)."""
    p = jax.tree.map(lambda x: x, self.abstract_params)  # fresh copy of the containers
    t = jax.tree.map(lambda x: x, self.abstract_tables)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(t, tables)
    return nnx.merge(self.graphdef, p, t)

  def logical_axes(self) -> tuple[PyTree, PyTree]:
    """Pure dicts of per-array logical axis names, matching (params, tables)."""
    axes = lambda state: nnx.to_pure_dict(jax.tree.map(
        lambda v: v.replace(value=_Axes(v.get_metadata().get("logical_axes", (None,) * len(v.shape)))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return axes(self.abstract_params), axes(self.abstract_tables)

  def abstract_arrays(self) -> tuple[PyTree, PyTree]:
    """ShapeDtypeStruct pure dicts of (params, tables)."""
    to_sds = lambda s: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(s))
    return to_sds(self.abstract_params), to_sds(self.abstract_tables)


class _Axes(tuple):
  """Logical axis names of one array; an unregistered tuple subclass, so pytrees keep it as a leaf."""


def _split(model: UniMAGE):
  graphdef, params, tables = nnx.split(model, nnx.Param, FixedTable)
  return graphdef, params, tables


def model_def(model_cfg: ml_collections.ConfigDict) -> ModelDef:
  """Abstract model (no allocation): shapes, dtypes, logical axes."""
  validate_model_config(model_cfg)
  graphdef, params, tables = _split(nnx.eval_shape(lambda: UniMAGE(model_cfg, nnx.Rngs(0))))
  return ModelDef(graphdef, params, tables)


def init_params(model_cfg: ml_collections.ConfigDict, seed: int) -> tuple[PyTree, PyTree]:
  """Fresh (params, tables) as pure dicts of arrays."""
  validate_model_config(model_cfg)
  _, params, tables = _split(UniMAGE(model_cfg, nnx.Rngs(params=seed)))
  return nnx.to_pure_dict(params), nnx.to_pure_dict(tables)


def abstract_params(model_cfg: ml_collections.ConfigDict) -> tuple[PyTree, PyTree]:
  """ShapeDtypeStruct pure dicts of (params, tables), computed with eval_shape."""
  return model_def(model_cfg).abstract_arrays()


def count(tree: PyTree) -> int:
  return sum(int(jnp.size(x)) if not hasattr(x, "size") else int(x.size) for x in jax.tree.leaves(tree))
