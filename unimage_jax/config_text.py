"""A config as sorted ``key = value`` lines, one per leaf: the values a run really uses.

Why: a run's effective config is ``base_config`` (``unimage_jax/config_base.py``), its config
file's updates, the stage preset (``apply_stage``) and the command line's overrides; this text is
the result of all four, in a form two runs diff line by line (``tools/show_config.py`` prints it,
the trainer writes it to ``<workdir>/config.txt``).
"""

from __future__ import annotations

from typing import Any

import ml_collections


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Dotted key -> leaf value (references resolved); an empty ConfigDict is a leaf ``{}``, so it shows."""
  leaves: dict[str, Any] = {}

  def walk(prefix: str, node: ml_collections.ConfigDict) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        if len(value):
          walk(f"{name}.", value)
        else:
          leaves[name] = {}
      else:
        leaves[name] = value

  walk("", config.copy_and_resolve_references())
  return leaves


def config_text(config: ml_collections.ConfigDict) -> str:
  """``key = repr(value)`` per leaf, sorted by key, one line each."""
  return "".join(f"{key} = {value!r}\n" for key, value in sorted(flatten(config).items()))


class _Unset:
  """A key one side of :func:`changes` does not have."""

  def __repr__(self) -> str:
    return "(unset)"


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
  """``key: old -> new`` for every leaf that differs between two :func:`flatten` results."""
  unset = _Unset()
  return [f"{key}: {before.get(key, unset)!r} -> {after.get(key, unset)!r}"
          for key in sorted(before.keys() | after.keys()) if before.get(key, unset) != after.get(key, unset)]
