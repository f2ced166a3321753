"""TFDS builders writing ArrayRecord (no TensorFlow needed): StoryWorld and user storyboards."""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from data_pipelines.builders.records import decode_record
from unimage_jax import atomic_io
from unimage_jax.errors import UserError


class DataError(UserError, ValueError):
  """A dataset that cannot be read or built (corrupt files, no usable record); names the path."""


def prepare(builder: tfds.core.DatasetBuilder, rebuild: bool = False) -> None:
  """Builds in-process (no Beam). ``rebuild`` regenerates an existing build instead of reusing it."""
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if rebuild else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_runner=None, download_mode=mode))


def build_storyworld(data_dir: str, num_stories: int = 1000, image_size: int = 64, seed: int = 0,
                     num_validation: int | None = None):
  from data_pipelines.builders.storyworld import StoryWorld, make_config
  b = StoryWorld(data_dir=data_dir, config=make_config(num_stories, image_size, seed, num_validation),
                 file_format="array_record")
  prepare(b)
  return b


def build_storyboards(data_dir: str, jsonl_path: str, image_dir: str, image_size: int = 64,
                      skip_bad_records: bool = False, config_name: str = "default"):
  """Imports a user's JSONL; returns the finished build (``builder.report`` has the counts).

  Always a fresh import (the JSONL may have changed), built in a temporary data dir and renamed
  over ``<data_dir>/storyboards/<config_name>/<version>`` only when complete: a failed import
  (a bad record, no usable record) leaves the previous build as it was.
  """
  from data_pipelines.builders.storyboards import Storyboards, StoryboardsConfig
  if not os.path.isfile(jsonl_path):
    raise DataError(f"storyboards file not found: {jsonl_path} (--jsonl)")
  if not os.path.isdir(image_dir):
    raise DataError(f"image folder not found: {image_dir} (--image_dir)")
  cfg = StoryboardsConfig(name=config_name, jsonl_path=os.path.abspath(jsonl_path),
                          image_dir=os.path.abspath(image_dir), image_size=image_size,
                          skip_bad_records=skip_bad_records)
  os.makedirs(data_dir, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".build-storyboards-", dir=data_dir)  # same filesystem: rename is atomic
  try:
    b = Storyboards(data_dir=scratch, config=cfg, file_format="array_record")
    prepare(b, rebuild=True)
    final = os.path.join(data_dir, os.path.relpath(b.data_dir, scratch))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    atomic_io.replace_dir(b.data_dir, final)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  built = tfds.builder_from_directory(final)
  built.report = b.report
  return built


class DatasetNotBuiltError(UserError, FileNotFoundError):
  """No finished build of the dataset (as opposed to an ambiguous choice between builds)."""


class AmbiguousDatasetError(UserError, FileNotFoundError):
  """Several builds of the dataset (or none matching ``config.data.dataset_config``) and no choice made."""


def built_configs(data_dir: str, dataset: str) -> list[str]:
  """Names of the finished builds of a dataset under data_dir."""
  root = os.path.join(data_dir, dataset)
  if not os.path.isdir(root):
    return []
  names = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  return [n for n in names if any(os.path.exists(os.path.join(root, n, v, "dataset_info.json"))
                                  for v in os.listdir(os.path.join(root, n)))]


def find_dataset_dir(data_dir: str, dataset: str, config_name: str = "", prefer: str = "") -> str:
  """The versioned directory of a built dataset; clear error when missing or ambiguous.

  ``config_name`` selects a build; if empty, the only build is used, or ``prefer`` when several.
  """
  root = os.path.join(data_dir, dataset)
  configs = built_configs(data_dir, dataset)
  if not configs:
    raise DatasetNotBuiltError(f"dataset {dataset!r} not found under {data_dir} (config.data.data_dir); "
                               "build it with tools/build_data.py")
  if config_name:
    configs = [c for c in configs if c == config_name]
  elif len(configs) > 1 and prefer in configs:
    configs = [prefer]
  if len(configs) != 1:
    raise AmbiguousDatasetError(f"expected one built config of {dataset!r} in {root} matching "
                                f"{config_name or '*'!r} (config.data.dataset_config), found {configs}")
  cdir = os.path.join(root, configs[0])
  versions = sorted(v for v in os.listdir(cdir) if os.path.exists(os.path.join(cdir, v, "dataset_info.json")))
  if not versions:
    raise DatasetNotBuiltError(f"{cdir} holds no finished build (dataset_info.json missing); "
                               "build it with tools/build_data.py")
  return os.path.join(cdir, versions[-1])


def _summary(e: BaseException) -> str:
  text = str(e).strip()
  line = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
  return line if len(line) <= 240 else line[:237] + "..."


class CheckedSource:
  """A built split's random-access source whose read errors name the ArrayRecord file and record.

  Grain-compatible (``__len__``, ``__getitem__``, ``__getitems__``) and picklable for worker
  processes. :meth:`verify` reads the first and last record of every shard file, which is where
  a truncated or overwritten file fails, so a corrupt build is reported before training compiles.
  """

  def __init__(self, source, files: list[str], shard_lengths: list[int]):
    self._source, self.files, self.shard_lengths = source, files, list(shard_lengths)
    self._starts = [sum(self.shard_lengths[:k]) for k in range(len(self.shard_lengths))]

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int) -> str:
    for k in reversed(range(len(self._starts))):
      if index >= self._starts[k]:
        return f"{self.files[k]} (record {index - self._starts[k]})"
    return f"record {index}"

  def __getitem__(self, index: int):
    try:
      record = self._source[index]
    except Exception as e:  # noqa: BLE001 - ArrayRecord/TFDS decode errors name no file
      raise DataError(f"{self._where(int(index))} cannot be read ({_summary(e)}); the build is damaged: "
                      "rebuild it with tools/build_data.py") from None
    return record

  def __getitems__(self, indices):
    try:
      return self._source.__getitems__(indices)
    except Exception:  # noqa: BLE001 - find the record that fails and name it
      return [self[i] for i in indices]

  def verify(self) -> "CheckedSource":
    for start, n in zip(self._starts, self.shard_lengths):
      for index in {start, start + n - 1} if n else ():
        self[index]
    return self


def load_source(data_dir: str, dataset: str, split: str = "train", config_name: str = "", prefer: str = ""):
  """Random-access ArrayRecord source of a built split (a Grain-compatible data source).

  A damaged build (unreadable ``dataset_info.json``, truncated or overwritten ArrayRecord file)
  raises :class:`DataError` naming the file.
  """
  directory = find_dataset_dir(data_dir, dataset, config_name, prefer)
  try:
    builder = tfds.builder_from_directory(directory)
    info = builder.info.splits[split]
    files, lengths = [str(p) for p in info.filepaths], list(info.shard_lengths)
  except KeyError:
    raise DataError(f"{directory} has no {split!r} split") from None
  except Exception as e:  # noqa: BLE001 - a bad JSON file names neither itself nor the build
    raise DataError(f"{directory}: dataset_info.json / features.json cannot be read ({_summary(e)}); "
                    "rebuild it with tools/build_data.py") from None
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise DataError(f"{directory}: ArrayRecord file(s) missing: {', '.join(missing)}; "
                    "rebuild it with tools/build_data.py")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001
    raise DataError(f"{directory}: the {split!r} split cannot be opened ({_summary(e)}); files {files}") from None
  return CheckedSource(source, files, lengths).verify()
