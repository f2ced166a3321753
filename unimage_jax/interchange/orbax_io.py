"""The trainer's checkpoint items, read and written outside the trainer.

Format (shared with the trainer): an ``orbax.checkpoint.CheckpointManager`` directory whose steps
hold the items ``params`` and ``tables`` (pure-dict trees, ``StandardSave``), with the experiment
config as ``<workdir>/config.json`` (``config.to_json()``). Other items (optimizer state, EMA,
data iterator) are ignored here.

Why per-array reads: exporting a 7B checkpoint must not need the whole model in host memory.
:class:`LazyCheckpoint` reads one array at a time, and one *layer* of a stacked (scanned) array at
a time, through TensorStore with the read spec Orbax builds for the item, so peak memory is set by
the largest unstacked tensor (the embedding), not by a stacked ``[layers, ...]`` leaf.
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
# Storage chunks of at most this size: readers (export) then decode a big array chunk by chunk
# instead of holding a second full-size copy; any Orbax reader restores them unchanged.
CHUNK_BYTES = 64 << 20

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
    chunked = lambda tree: jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params, save_args=chunked(params)),
        tables=ocp.args.StandardSave(tables, save_args=chunked(tables))), force=True)
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
  """Per-array access to one step's ``params``/``tables`` items, read as numpy on demand.

  Arrays are opened through TensorStore with the spec Orbax itself builds, so a stacked array can
  be read one layer at a time (``lazy[i]``); where that is not possible (an unknown storage
  layout) it falls back to an Orbax ``partial_restore`` of the whole array.
  """

  def __init__(self, directory: str, step: int | None = None):
    self.directory = _abs(directory)
    self.step = latest_step(self.directory) if step is None else step
    self._ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    self._meta: dict[str, Any] = {}
    self._ts_context = None

  def item_dir(self, item: str) -> str:
    return os.path.join(self.directory, str(self.step), item)

  def _raw_metadata(self, item: str):
    if item not in self._meta:
      self._meta[item] = self._ckptr.metadata(self.item_dir(item)).item_metadata
    return self._meta[item]

  def metadata(self, item: str) -> PyTree:
    """Tree of ``ShapeDtypeStruct`` for an item (no data read)."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), self._raw_metadata(item).tree,
                        is_leaf=_is_array_meta)

  def open(self, item: str, path: tuple[str, ...]):
    """A TensorStore handle of one array, or None when the layout is not one we can open directly."""
    try:
      import tensorstore as ts
      from etils import epath
      from orbax.checkpoint._src.serialization import tensorstore_utils

      meta = self._raw_metadata(item)
      leaf = meta.tree
      for p in path:
        leaf = leaf[p]
      use_ocdbt = os.path.exists(os.path.join(self.item_dir(item), "manifest.ocdbt"))
      if self._ts_context is None:
        self._ts_context = ts.Context({"cache_pool#ocdbt": {}})
      info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=epath.Path(self.item_dir(item)),
                                         use_zarr3=bool(getattr(meta, "use_zarr3", False)),
                                         ts_context=self._ts_context)
      spec = tensorstore_utils.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
      return ts.open(spec, read=True, open=True, context=self._ts_context).result()
    except Exception:  # noqa: BLE001 - any failure means: use the Orbax path instead
      return None

  def get(self, item: str, path: tuple[str, ...]) -> np.ndarray:
    """One whole array as numpy."""
    handle = self.open(item, path)
    if handle is not None:
      return np.asarray(handle.read().result())
    nest = lambda leaf: _nest(path, leaf)
    restored = self._ckptr.restore(self.item_dir(item), args=ocp.args.PyTreeRestore(
        item=nest(0), restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)), partial_restore=True))
    for p in path:
      restored = restored[p]
    return restored

  def lazy(self, item: str, path: tuple[str, ...], meta) -> "LazyArray":
    return LazyArray(self, item, path, tuple(meta.shape), meta.dtype)

  def tree(self, item: str) -> "LazyTree":
    return LazyTree(self, item, ())


def _is_array_meta(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


class LazyArray:
  """An array in the checkpoint: ``x[i]`` reads one leading-axis slice, ``np.asarray(x)`` reads all."""

  def __init__(self, ckpt: LazyCheckpoint, item: str, path: tuple[str, ...], shape, dtype):
    self._ckpt, self._item, self._path = ckpt, item, path
    self.shape, self.dtype = shape, np.dtype(dtype)
    self.ndim = len(shape)
    self._whole: np.ndarray | None = None

  def __getitem__(self, index):
    handle = self._ckpt.open(self._item, self._path)
    if handle is not None:
      return np.asarray(handle[index].read().result())
    if self._whole is None:  # fallback: whole array once, then slices of it
      self._whole = self._ckpt.get(self._item, self._path)
    return self._whole[index]

  def __array__(self, dtype=None, copy=None):
    x = self._whole if self._whole is not None else self._ckpt.get(self._item, self._path)
    return x if dtype is None else x.astype(dtype)


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
    return self._ckpt.lazy(self._item, (*self._path, name), sub)

  def __contains__(self, name: str) -> bool:
    return name in self._meta

  def keys(self):
    return self._meta.keys()


def has_item(directory: str, step: int, item: str) -> bool:
  """Whether a step directory holds ``item`` (e.g. the trainer's optional ``ema``)."""
  return os.path.isdir(os.path.join(_abs(directory), str(step), item))


def restore_item(directory: str, step: int, item: str) -> PyTree:
  """One pure-dict item of a step as a numpy tree, read array by array."""
  ckpt = LazyCheckpoint(directory, step)
  meta = ckpt.metadata(item)
  tree: dict = {}
  for kp, _ in jax.tree_util.tree_flatten_with_path(meta)[0]:
    path = tuple(k.key for k in kp)
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = ckpt.get(item, path)
  return tree


def restore_params(directory: str, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None) -> tuple[PyTree, PyTree, ml_collections.ConfigDict]:
  """(params, tables, config) of a step (latest by default) as numpy trees, one array at a time.

  ``config`` defaults to ``<directory>/config.json``. Arrays are read individually, so peak memory
  is the restored trees plus one array in flight, with no second copy.
  """
  config = load_config_json(directory) if config is None else config
  step = latest_step(directory) if step is None else step
  return restore_item(directory, step, "params"), restore_item(directory, step, "tables"), config
