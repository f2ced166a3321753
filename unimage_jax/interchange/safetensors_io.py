"""Streaming safetensors: a sharded writer that holds one tensor at a time, and a lazy reader.

Why not ``safetensors.numpy.save_file``: it needs the whole shard as a dict in memory, so peak host
memory would be a shard (gigabytes), not a tensor. The format is simple (8-byte little-endian
header length, a JSON header with dtype/shape/byte offsets, then raw little-endian data), so the
writer plans every shard's header from shapes first and then streams the bytes tensor by tensor.
The reader memory-maps files and parses headers itself, which also covers bf16 (numpy has no bf16;
``ml_dtypes.bfloat16`` has the same bytes as torch's).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "ema.safetensors"  # BAGEL's stock loaders read exactly this one file
VAE_NAME = "ae.safetensors"  # FLUX VAE weights beside the model in a BAGEL release folder

_TO_ST = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}


def st_dtype(dtype) -> str:
  return _TO_ST[np.dtype(dtype)]


def shard_name(i: int, n: int) -> str:
  return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str]) -> bytes:
  header: dict = {"__metadata__": metadata}
  offset = 0
  for key, shape, dtype in entries:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[key] = {"dtype": st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
  """Writes planned tensors, in plan order, into ``model-XXXXX-of-YYYYY.safetensors`` + index JSON.

  ``plan`` lists (key, shape, dtype) of every tensor. Shards close when they would exceed
  ``max_shard_bytes`` (a tensor larger than that gets a shard of its own); ``max_shard_bytes=None``
  writes one ``ema.safetensors`` and no index, the single file BAGEL's loaders read. Each
  :meth:`write` checks the tensor against the plan, so a writer bug cannot produce a silently
  corrupt file.
  """

  def __init__(self, directory: str, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               max_shard_bytes: int | None = 5 << 30, metadata: dict[str, str] | None = None,
               block_bytes: int = 64 << 20):
    self.directory = directory
    self.block_bytes = block_bytes
    self.metadata = {"format": "pt", **(metadata or {})}
    os.makedirs(directory, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for key, shape, dtype in plan:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      if shards[-1] and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append((key, tuple(shape), np.dtype(dtype)))
      size += nbytes
    self._shards = shards
    self.single_file = max_shard_bytes is None
    self._names = [SINGLE_NAME] if self.single_file else [shard_name(i, len(shards)) for i in range(len(shards))]
    self._queue: Iterator[tuple[int, int]] = iter(
        [(s, j) for s, entries in enumerate(shards) for j in range(len(entries))])
    self._file = None
    self._open_shard = -1
    self.total_bytes = sum(math.prod(sh) * dt.itemsize for entries in shards for _, sh, dt in entries)

  def write(self, key: str, array: np.ndarray) -> None:
    shard, j = next(self._queue)
    want_key, want_shape, want_dtype = self._shards[shard][j]
    if key != want_key or tuple(array.shape) != want_shape:
      raise ValueError(f"writer expected {want_key} {want_shape}, got {key} {tuple(array.shape)}")
    if shard != self._open_shard:
      self._close_file()
      self._file = open(os.path.join(self.directory, self._names[shard]), "wb")
      self._file.write(_header_bytes(self._shards[shard], self.metadata))
      self._open_shard = shard
    # Row blocks of at most ~block_bytes: a transposed view or a dtype cast is materialised one
    # block at a time, never as a second full-size tensor.
    array = np.asarray(array)
    if array.ndim == 0:
      array = array.reshape(1)
    row_bytes = max(1, math.prod(array.shape[1:]) * want_dtype.itemsize)
    step = max(1, self.block_bytes // row_bytes)
    for i in range(0, array.shape[0], step):
      block = np.ascontiguousarray(array[i:i + step], dtype=want_dtype)
      self._file.write(block.reshape(-1).view(np.uint8))
      del block

  @property
  def names(self) -> list[str]:
    """Shard file names, in order."""
    return list(self._names)

  def _close_file(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> None:
    """Finishes the last shard and writes the index JSON; fails if planned tensors were not written."""
    left = list(self._queue)
    self._close_file()
    if left:
      raise ValueError(f"{len(left)} planned tensors were never written, first: {self._shards[left[0][0]][left[0][1]][0]}")
    if self.single_file:
      if self._open_shard < 0:  # an empty plan still leaves a valid file
        with open(os.path.join(self.directory, self._names[0]), "wb") as f:
          f.write(_header_bytes(self._shards[0], self.metadata))
      return
    index = {"metadata": {"total_size": self.total_bytes},
             "weight_map": {key: self._names[s] for s, entries in enumerate(self._shards) for key, _, _ in entries}}
    with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2)


def write_sharded(directory: str, plan, tensors: Iterable[tuple[str, np.ndarray]], **kw) -> list[str]:
  """Streams ``tensors`` (in plan order) into shards; returns the shard file names."""
  writer = ShardedWriter(directory, plan, **kw)
  for key, array in tensors:
    writer.write(key, array)
  writer.close()
  return writer.names


class SafetensorsReader:
  """Lazy, memory-mapped view of one ``.safetensors`` file, a sharded directory, or an index file.

  ``reader[key]`` returns a numpy array backed by the mapped file (pages are read on access), so
  importing touches one tensor at a time.
  """

  def __init__(self, path: str):
    files = self._files(path)
    self._where: dict[str, tuple[str, dict]] = {}
    self._maps: dict[str, np.memmap] = {}
    self._data_start: dict[str, int] = {}
    for file in files:
      with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      self._data_start[file] = 8 + n
      self.metadata = header.pop("__metadata__", {}) or {}
      for key, info in header.items():
        if key in self._where:
          raise ValueError(f"tensor {key} appears in two files: {self._where[key][0]} and {file}")
        self._where[key] = (file, info)

  @staticmethod
  def _files(path: str) -> list[str]:
    """A folder means its model weights: ``ema.safetensors`` (BAGEL), else the index's shards, else
    every ``*.safetensors`` except the VAE's ``ae.safetensors`` (a release folder holds both)."""
    if os.path.isdir(path):
      index = os.path.join(path, INDEX_NAME)
      if os.path.exists(os.path.join(path, SINGLE_NAME)):
        return [os.path.join(path, SINGLE_NAME)]
      if os.path.exists(index):
        path = index
      else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != VAE_NAME)
        if not files:
          raise FileNotFoundError(f"no .safetensors files in {path}")
        return [os.path.join(path, f) for f in files]
    if path.endswith(".json"):
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
      base = os.path.dirname(path)
      return [os.path.join(base, f) for f in sorted(set(weight_map.values()))]
    return [path]

  def keys(self) -> set[str]:
    return set(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return _FROM_ST[self._where[key][1]["dtype"]]

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise KeyError(f"{key} is not in the checkpoint")
    file, info = self._where[key]
    if file not in self._maps:
      self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    start = self._data_start[file]
    raw = self._maps[file][start + begin:start + end]
    return raw.view(_FROM_ST[info["dtype"]]).reshape(info["shape"])
