"""Loads a ``configs/*.py`` file outside absl (tests, notebooks, tools that take a path)."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(path: str | pathlib.Path, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (relative paths resolve from the repository root).

  ``path:arg`` passes ``arg`` to ``get_config`` as ml_collections' config flags do
  (``configs/tiny.py:stage2``).
  """
  path, _, arg = str(path).partition(":")
  path = pathlib.Path(path)
  if not path.is_absolute() and not path.exists():
    path = REPO_ROOT / path
  if not path.exists():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"unimage_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for dotted, value in (overrides or {}).items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
