"""Write a folder completely or not at all: build it beside its destination, rename it into place.

Why: a build or export that fails half-way (a bad record, a corrupt checkpoint, a full disk) must
leave the previous good output untouched and no partial file where readers look. The new folder
is written to a hidden sibling (same filesystem, so the final ``os.rename`` is atomic), and only a
finished one replaces the destination; a failure removes the temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from unimage_jax.errors import UserError


class OutputExistsError(UserError, FileExistsError):
  """The output folder holds something this tool must not replace."""


def is_empty_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.listdir(path)


def _sibling(path: str, tag: str) -> str:
  parent, name = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_dir(src: str, dst: str) -> None:
  """Moves the finished folder ``src`` to ``dst``, replacing what was there only at the very end."""
  if not os.path.lexists(dst):
    os.rename(src, dst)
    return
  old = _sibling(dst, "old")
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)  # put the previous output back
    raise
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dst: str) -> Iterator[str]:
  """Yields a fresh temporary folder; on success it becomes ``dst`` (replacing it), on failure it is removed."""
  parent = os.path.dirname(os.path.abspath(dst))
  os.makedirs(parent, exist_ok=True)
  tmp = _sibling(dst, "tmp")
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  replace_dir(tmp, dst)
