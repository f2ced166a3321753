"""Where training batches come from: the Grain pipeline, or an in-memory synthetic pool.

Both give an iterator of global ``jax.Array`` batches (rows by the ``batch`` rule, und/gen lengths by ``length``)
with Grain-compatible ``get_state``/``set_state``, so the checkpoint holds the exact data position
and a resumed run sees the same batches.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unimage_jax import layout, sharding, synthetic
from unimage_jax.model.unimage import latent_token_dim


def to_global_arrays(local_batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int,
                     rules=None) -> dict[str, jax.Array]:
  """This process's rows -> global arrays: rows by the ``batch`` rule, the und/gen buffers' length
  by the ``length`` rule (``config.logical_axis_rules``; see ``sharding.batch_shardings``)."""
  shapes = {k: (global_rows, *v.shape[1:]) for k, v in local_batch.items()}
  s = sharding.batch_shardings(mesh, rules, shapes)
  return {k: jax.make_array_from_process_local_data(s[k], v, shapes[k]) for k, v in local_batch.items()}


class SyntheticIterator:
  """Cycles over ``data.synthetic_pool`` fixed random batches (layout tests, smoke runs)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config, self.mesh = config, mesh
    self.index = 0
    rows = config.data.batch_size
    p, n = jax.process_index(), jax.process_count()
    lo, hi = p * rows // n, (p + 1) * rows // n
    self.pool = [{k: v[lo:hi] for k, v in synthetic.random_batch(config, seed=config.data.seed + i).items()}
                 for i in range(config.data.synthetic_pool)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = self.pool[self.index % len(self.pool)]
    self.index += 1
    return to_global_arrays(local, self.mesh, self.config.data.batch_size, self.config.logical_axis_rules)

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state: bytes) -> None:
    self.index = json.loads(state)["index"]

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls this after set_state; nothing to prefetch here."""

  def resume_elastic(self, states: dict, directory: str = "") -> str:
    """Another process count: every process cycled the same pool position, so it carries over."""
    self.index = max(json.loads(s)["index"] if isinstance(s, (str, bytes)) else s["index"] for s in states.values())
    return f"the synthetic pool continues at batch {self.index} (exactly once)"


def make_data_iterator(config: ml_collections.ConfigDict, mesh: Mesh):
  if config.data.dataset == "synthetic":
    return SyntheticIterator(config, mesh)
  from data_pipelines import pipeline
  if jax.process_index() == 0:
    pipeline.ensure_dataset(config)  # builds StoryWorld + tokenizer when missing (seconds)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("unimage_jax.ensure_dataset")
  return pipeline.make_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count(), mesh=mesh)


def batch_spec(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch (for ahead-of-time lowering without data)."""
  m, d = config.model, config.data
  row = layout.empty_row(layout.BufferSizes(d.und_len, d.gen_len, d.vit_len, d.max_segments),
                         latent_token_dim(m), m.vit.patch_size**2 * 3)
  shapes = {k: (d.batch_size, *v.shape) for k, v in row.items()}
  s = sharding.batch_shardings(mesh, config.logical_axis_rules, shapes)
  return {k: jax.ShapeDtypeStruct(shapes[k], jnp.dtype(v.dtype), sharding=s[k]) for k, v in row.items()}
