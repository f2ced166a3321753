"""The trainer's checkpoint items, read and written outside the trainer.

Format (shared with the trainer): an ``orbax.checkpoint.CheckpointManager`` directory whose steps
hold the items ``params`` and ``tables`` (pure-dict trees, ``StandardSave``), with the experiment
config as ``<workdir>/config.json`` (``config.to_json()``). Other items (optimizer state, EMA,
data iterator) are ignored here.

Why per-array restore: exporting a 7B checkpoint must not need the whole model in host memory.
:class:`LazyCheckpoint` restores one array at a time through a ``partial_restore`` of the item's
PyTree handler, and keeps only the most recently used array alive.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_NAME = "config.json"
ITEMS = ("params", "tables")

PyTree = Any


def _abs(directory: str) -> str:
  return os.path.abspath(os.fspath(directory))


def save_params(directory: str, step: int, params: PyTree, tables: PyTree,
                config: ml_collections.ConfigDict) -> None:
  """Writes step ``step`` with the ``params`` and ``tables`` items and ``config.json`` next to it."""
  directory = _abs(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    f.write(config.to_json(indent=2))
  with ocp.CheckpointManager(directory) as mgr:
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           tables=ocp.args.StandardSave(tables)), force=True)
    mgr.wait_until_finished()


def load_config_json(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(_abs(directory), CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the checkpoint's config.json (config.to_json()) is needed")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def latest_step(directory: str) -> int:
  with ocp.CheckpointManager(_abs(directory)) as mgr:
    step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps in {directory}")
  return step


class LazyCheckpoint:
  """Per-array access to one step's ``params``/``tables`` items, restored as numpy on demand."""

  def __init__(self, directory: str, step: int | None = None):
    self.directory = _abs(directory)
    self.step = latest_step(self.directory) if step is None else step
    self._ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    self._cache: tuple[tuple, np.ndarray] | None = None

  def item_dir(self, item: str) -> str:
    return os.path.join(self.directory, str(self.step), item)

  def metadata(self, item: str) -> PyTree:
    """Tree of ``ShapeDtypeStruct`` for an item (no data read)."""
    tree = self._ckptr.metadata(self.item_dir(item)).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))

  def get(self, item: str, path: tuple[str, ...]) -> np.ndarray:
    """One array of an item; the previous one is released first (memory stays one array)."""
    key = (item, *path)
    if self._cache is not None and self._cache[0] == key:
      return self._cache[1]
    self._cache = None
    nest = lambda leaf: _nest(path, leaf)
    restored = self._ckptr.restore(self.item_dir(item), args=ocp.args.PyTreeRestore(
        item=nest(0), restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)), partial_restore=True))
    for p in path:
      restored = restored[p]
    self._cache = (key, restored)
    return restored

  def tree(self, item: str) -> "LazyTree":
    return LazyTree(self, item, ())


def _nest(path: tuple[str, ...], leaf):
  for p in reversed(path):
    leaf = {p: leaf}
  return leaf


class LazyTree:
  """Dict-like view of an item: indexing walks the metadata; reaching a leaf restores that array."""

  def __init__(self, ckpt: LazyCheckpoint, item: str, path: tuple[str, ...], meta: PyTree = None):
    self._ckpt, self._item, self._path = ckpt, item, path
    self._meta = ckpt.metadata(item) if meta is None else meta

  def __getitem__(self, name: str):
    sub = self._meta[name]
    if isinstance(sub, dict):
      return LazyTree(self._ckpt, self._item, (*self._path, name), sub)
    return self._ckpt.get(self._item, (*self._path, name))

  def __contains__(self, name: str) -> bool:
    return name in self._meta

  def keys(self):
    return self._meta.keys()


def restore_params(directory: str, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None) -> tuple[PyTree, PyTree, ml_collections.ConfigDict]:
  """(params, tables, config) of a step (latest by default) as numpy trees, one array at a time.

  ``config`` defaults to ``<directory>/config.json``. Arrays are read individually, so peak memory
  is the restored trees plus one array in flight, with no second copy.
  """
  config = load_config_json(directory) if config is None else config
  ckpt = LazyCheckpoint(directory, step)
  out = []
  for item in ITEMS:
    meta = ckpt.metadata(item)
    paths = [tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(meta)[0]]
    tree: dict = {}
    for path in paths:
      node = tree
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = ckpt.get(item, path)
    out.append(tree)
  return out[0], out[1], config
