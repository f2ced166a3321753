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

import dataclasses
import json
import os
import re
from typing import Any, Callable, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from unimage_jax.errors import UserError

CONFIG_NAME = "config.json"
CHECKPOINTS = "checkpoints"  # the folder of a training workdir that holds the step directories
ITEMS = ("params", "tables")
# Storage chunks of at most this size: readers (export) then decode a big array chunk by chunk
# instead of holding a second full-size copy; any Orbax reader restores them unchanged.
CHUNK_BYTES = 64 << 20
# Orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when finished.
_UNFINISHED = re.compile(r"^\d+\.orbax-checkpoint-tmp-\d+$")
CORRUPT_SUFFIX = ".corrupt"
# value types Orbax stores as TensorStore arrays (strings and empty nodes live in the metadata files)
_TENSORSTORE_TYPES = ("jax.Array", "np.ndarray", "scalar")

PyTree = Any
T = TypeVar("T")


class CheckpointError(UserError, FileNotFoundError):
  """No usable checkpoint where one was asked for (missing folder or step, unreadable step, ...)."""


class NoUsableCheckpointError(UserError, RuntimeError):
  """Every step in the directory failed to restore (each one is listed with its error)."""


class CheckpointReadError(Exception):
  """One step could not be read (truncated or missing files, bad metadata); the fallback's signal."""


def _abs(directory: str) -> str:
  return os.path.abspath(os.fspath(directory))


def checkpoint_dir(path: str) -> str:
  """A training workdir or its checkpoints folder -> the folder that holds the Orbax step directories."""
  sub = os.path.join(path, CHECKPOINTS)
  return sub if os.path.isdir(sub) else path


def existing_checkpoint_dir(path: str) -> str:
  """:func:`checkpoint_dir` of a folder that must exist: the readers' ``--checkpoint``."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path} does not exist")
  return checkpoint_dir(path)


def run_steps(path: str) -> list[int]:
  """:func:`finished_steps` of a training workdir or its checkpoints folder."""
  return finished_steps(checkpoint_dir(path))


def finished_steps(directory: str) -> list[int]:
  """Steps Orbax finished writing (plain ``<step>`` directories), ascending; no side effects."""
  directory = _abs(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def unfinished_saves(directory: str) -> list[str]:
  """Temporary step directories left by a save that never finished (the process died mid-write)."""
  directory = _abs(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if _UNFINISHED.match(n))


def move_aside(directory: str, step: int) -> str:
  """Renames ``<directory>/<step>`` to ``<step>.corrupt`` (``.corrupt-2``, ... if taken); returns the new path."""
  src = os.path.join(_abs(directory), str(step))
  dst, n = src + CORRUPT_SUFFIX, 1
  while os.path.exists(dst):
    n += 1
    dst = f"{src}{CORRUPT_SUFFIX}-{n}"
  os.rename(src, dst)
  return dst


def error_summary(e: BaseException, limit: int = 240) -> str:
  """``Type: first line of the message`` (TensorStore errors run to pages), at most ``limit`` chars."""
  text = str(e).strip()
  line = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
  return line if len(line) <= limit else line[:limit - 3] + "..."


def with_fallback(directory: str, load: Callable[[int], T], *, step: int | None = None,
                  on_fallback: Callable[[list[int], int], None] | None = None) -> tuple[int, T]:
  """``load(step)`` on the newest step that reads; the one fallback every checkpoint reader uses.

  ``load`` raises :class:`CheckpointReadError` for an unreadable step; each such step is reported
  by a warning naming it and the error, and the next older step is tried. ``on_fallback(failed,
  good)`` runs once an older step loaded (the trainer moves the failed ones aside there). An
  explicit ``step`` is read or refused, never replaced by another. Any other exception (e.g. a
  model that does not match the checkpoint) propagates unchanged.
  """
  directory = _abs(directory)
  steps = finished_steps(directory)
  if not steps:
    where = f"{directory} does not exist" if not os.path.isdir(directory) else f"no checkpoint steps in {directory}"
    unfinished = unfinished_saves(directory)
    if unfinished:
      where += f" (only unfinished saves: {', '.join(unfinished)})"
    raise CheckpointError(where)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"step {step} is not in {directory}; its steps are {steps}")
    try:
      return step, load(step)
    except CheckpointReadError as e:
      raise CheckpointError(f"checkpoint {directory}/{step} cannot be read ({e})") from e
  failed, errors = [], []
  for s in reversed(steps):
    try:
      value = load(s)
    except CheckpointReadError as e:
      failed.append(s)
      errors.append(f"step {s}: {e}")
      logging.warning("checkpoint %s/%d is unusable (%s); falling back to the previous one", directory, s, e)
      continue
    if failed and on_fallback is not None:
      on_fallback(failed, s)
    return s, value
  raise NoUsableCheckpointError(f"no checkpoint in {directory} could be restored:\n  " + "\n  ".join(errors))


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
    raise CheckpointError(f"{path} is missing: the checkpoint's config.json (config.to_json()) is needed")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} cannot be read: {error_summary(e)}") from None


def saved_config(directory: str, step: int) -> dict | None:
  """The config a trainer step was saved with (its ``meta`` item), or None (imports have no meta)."""
  path = os.path.join(_abs(directory), str(step), "meta", "metadata")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f).get("config")
  except (OSError, ValueError) as e:
    raise CheckpointReadError(f"{path}: {error_summary(e)}") from None
  return config if isinstance(config, dict) else None


def step_config(directory: str, step: int) -> ml_collections.ConfigDict:
  """The config of one step: the one it was saved with, else ``<directory>/config.json``."""
  config = saved_config(directory, step)
  return ml_collections.ConfigDict(config) if config is not None else load_config_json(directory)


def latest_step(directory: str) -> int:
  steps = finished_steps(directory)
  if not steps:
    raise CheckpointError(f"no checkpoint steps in {directory}")
  return steps[-1]


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

  def _context(self):
    if self._ts_context is None:
      import tensorstore as ts
      self._ts_context = ts.Context({"cache_pool#ocdbt": {}})
    return self._ts_context

  def _read_spec(self, item: str, name: str, use_zarr3: bool) -> dict:
    from etils import epath
    from orbax.checkpoint._src.serialization import tensorstore_utils
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.item_dir(item)), use_zarr3=use_zarr3,
                                       ts_context=self._context())
    use_ocdbt = os.path.exists(os.path.join(self.item_dir(item), "manifest.ocdbt"))
    return tensorstore_utils.get_json_tspec_read(info, use_ocdbt=use_ocdbt)

  def _check_arrays_open(self, item: str) -> None:
    """Opens every array of the item and waits for each open to finish; raises on the first failure.

    Orbax's metadata read opens the arrays under one ``asyncio.gather``: when one fails (a
    truncated file), its event loop closes while the other opens are still running, and each of
    them later prints a ``RuntimeError: Event loop is closed`` traceback. Blocking opens here leave
    nothing running, so an unreadable step is reported by its error alone.
    """
    import tensorstore as ts
    path = os.path.join(self.item_dir(item), "_METADATA")
    with open(path) as f:
      saved = json.load(f)
    use_zarr3 = bool(saved.get("use_zarr3", False))
    names = ['.'.join(str(k["key"]) for k in entry["key_metadata"]) for entry in saved["tree_metadata"].values()
             if entry["value_metadata"].get("value_type") in _TENSORSTORE_TYPES
             and not entry["value_metadata"].get("skip_deserialize")]
    futures = [ts.open(self._read_spec(item, name, use_zarr3), read=True, open=True, context=self._context())
               for name in names]
    errors = []
    for future in futures:  # every open is waited for, the failed ones too
      try:
        future.result()
      except Exception as e:  # noqa: BLE001 - reported below, after all opens finished
        errors.append(e)
    if errors:
      raise errors[0]

  def _raw_metadata(self, item: str):
    if item not in self._meta:
      try:
        from etils import epath
        self._check_arrays_open(item)
        # the handler reads the item's own metadata (the Checkpointer would also look for, and
        # warn about, a step-level metadata file that items of a composite step do not have)
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.item_dir(item)))
        meta.tree  # noqa: B018 - fails when the metadata files are missing or unreadable
      except Exception as e:  # noqa: BLE001 - any failure to read the metadata makes the step unreadable
        raise CheckpointReadError(f"{self.item_dir(item)}: metadata unreadable ({error_summary(e)})") from None
      self._meta[item] = meta
    return self._meta[item]

  def metadata(self, item: str) -> PyTree:
    """Tree of ``ShapeDtypeStruct`` for an item (no data read)."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), self._raw_metadata(item).tree,
                        is_leaf=_is_array_meta)

  def open(self, item: str, path: tuple[str, ...]):
    """A TensorStore handle of one array, or None when the layout is not one we can open directly."""
    try:
      import tensorstore as ts

      meta = self._raw_metadata(item)
      leaf = meta.tree
      for p in path:
        leaf = leaf[p]
      spec = self._read_spec(item, leaf.name, bool(getattr(meta, "use_zarr3", False)))
      return ts.open(spec, read=True, open=True, context=self._context()).result()
    except Exception:  # noqa: BLE001 - any failure means: use the Orbax path instead
      return None

  def get(self, item: str, path: tuple[str, ...]) -> np.ndarray:
    """One whole array as numpy."""
    return self.read(item, path, None)

  def read(self, item: str, path: tuple[str, ...], index, handle=None) -> np.ndarray:
    """``array[index]`` (the whole array for None); a failed read raises CheckpointReadError."""
    if handle is None:
      handle = self.open(item, path)
    try:
      if handle is not None:
        return np.asarray((handle if index is None else handle[index]).read().result())
      nest = lambda leaf: _nest(path, leaf)
      restored = self._ckptr.restore(self.item_dir(item), args=ocp.args.PyTreeRestore(
          item=nest(0), restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)), partial_restore=True))
      for p in path:
        restored = restored[p]
      return restored if index is None else restored[index]
    except Exception as e:  # noqa: BLE001 - truncated / missing chunk files, decode errors
      raise CheckpointReadError(f"{self.item_dir(item)}/{'.'.join(path)}: {error_summary(e)}") from None

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
    if self._whole is None:
      handle = self._ckpt.open(self._item, self._path)
      if handle is not None:
        return self._ckpt.read(self._item, self._path, index, handle)
      self._whole = self._ckpt.get(self._item, self._path)  # fallback: whole array once, then slices of it
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
  """(params, tables, config) of a step (the newest readable one by default) as numpy trees.

  ``directory`` may be a training workdir. ``config`` defaults to the step's own config. Arrays
  are read individually, so peak memory is the restored trees plus one array in flight.
  """
  loaded = load_checkpoint(directory, step, config=config)
  return loaded.params, loaded.tables, loaded.config


@dataclasses.dataclass
class LoadedCheckpoint:
  directory: str  # the folder holding the step directories
  step: int
  params: PyTree  # numpy; the EMA weights when asked for and saved
  tables: PyTree
  config: ml_collections.ConfigDict
  used_ema: bool = False


def load_checkpoint(path: str, step: int | None = None, *, use_ema: bool = False,
                    config: ml_collections.ConfigDict | None = None) -> LoadedCheckpoint:
  """The readers' entry point (director, evaluate, init_from): a workdir or checkpoints folder ->
  the newest step that reads completely (or exactly ``step``), through :func:`with_fallback`.

  With ``use_ema`` the saved EMA replaces the params (cast to their dtype) where the step has one.
  """
  directory = _abs(existing_checkpoint_dir(path))

  def load(s: int) -> LoadedCheckpoint:
    cfg = step_config(directory, s) if config is None else config
    params, tables = restore_item(directory, s, "params"), restore_item(directory, s, "tables")
    ema = use_ema and has_item(directory, s, "ema")
    if ema:
      params = jax.tree.map(lambda e, p: np.asarray(e).astype(p.dtype), restore_item(directory, s, "ema"), params)
    return LoadedCheckpoint(directory, s, params, tables, cfg, ema)

  return with_fallback(directory, load, step=step)[1]
