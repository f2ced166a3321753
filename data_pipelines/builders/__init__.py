"""TFDS builders writing ArrayRecord (no TensorFlow needed): StoryWorld and user storyboards."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data_pipelines.builders.records import decode_record


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
  """Imports a user's JSONL; returns the builder (``builder.report`` has the counts)."""
  from data_pipelines.builders.storyboards import Storyboards, StoryboardsConfig
  cfg = StoryboardsConfig(name=config_name, jsonl_path=os.path.abspath(jsonl_path),
                          image_dir=os.path.abspath(image_dir), image_size=image_size,
                          skip_bad_records=skip_bad_records)
  b = Storyboards(data_dir=data_dir, config=cfg, file_format="array_record")
  prepare(b, rebuild=True)  # the JSONL may have changed since the last import: always re-import
  return b


class DatasetNotBuiltError(FileNotFoundError):
  """No finished build of the dataset (as opposed to an ambiguous choice between builds)."""


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
    raise FileNotFoundError(f"expected one built config of {dataset!r} in {root} matching "
                            f"{config_name or '*'!r} (config.data.dataset_config), found {configs}")
  cdir = os.path.join(root, configs[0])
  versions = sorted(v for v in os.listdir(cdir) if os.path.exists(os.path.join(cdir, v, "dataset_info.json")))
  if not versions:
    raise FileNotFoundError(f"{cdir} holds no finished build (dataset_info.json missing)")
  return os.path.join(cdir, versions[-1])


def load_source(data_dir: str, dataset: str, split: str = "train", config_name: str = "", prefer: str = ""):
  """Random-access ArrayRecord source of a built split (a Grain-compatible data source)."""
  builder = tfds.builder_from_directory(find_dataset_dir(data_dir, dataset, config_name, prefer))
  return builder.as_data_source(split=split)
