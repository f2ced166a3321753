"""Our params -> BAGEL-layout safetensors shards + config JSONs, one tensor at a time.

Used by ``tools/export_torch.py``. The sources are anything ``keymap.export_one`` can index: real
numpy/JAX trees, or :class:`orbax_io.LazyTree` views that restore one array on demand, which keeps
peak host memory near the largest array instead of the model.
"""

from __future__ import annotations

import os

import ml_collections
import ml_dtypes
import numpy as np

from unimage_jax import atomic_io
from unimage_jax.atomic_io import OutputExistsError
from unimage_jax.errors import UserError
from unimage_jax.interchange import hf_configs, keymap, safetensors_io

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def export_params(params, tables, model_cfg: ml_collections.ConfigDict, out_dir: str, *,
                  dtype: str = "float32", abstract=None, max_shard_bytes: int | None = None) -> list[str]:
  """Writes every mapped tensor (floating ones cast to ``dtype``) and the config JSONs.

  ``max_shard_bytes=None`` (the default) writes one ``ema.safetensors``, the file BAGEL's stock
  loaders read; a size writes ``model-XXXXX-of-YYYYY.safetensors`` shards plus an index instead.
  ``abstract`` is ``(abstract_params, abstract_tables)``; computed from ``model_cfg`` when absent.
  Returns the weight file names.
  """
  from unimage_jax.model import functional

  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} must be one of {sorted(DTYPES)}")
  out_dtype = DTYPES[dtype]
  abstract_params, abstract_tables = abstract or functional.abstract_params(model_cfg)
  plan = keymap.export_plan(abstract_params, abstract_tables, model_cfg)
  cast = lambda d: out_dtype if np.issubdtype(np.dtype(d), np.floating) or np.dtype(d) == ml_dtypes.bfloat16 else np.dtype(d)
  writer_plan = [(e.key, e.shape, cast(e.dtype)) for e in plan]
  tensors = ((e.key, keymap.export_one(e, params, tables, contiguous=False)) for e in plan)
  names = safetensors_io.write_sharded(out_dir, writer_plan, tensors, max_shard_bytes=max_shard_bytes,
                                       metadata={"producer": "unimage_jax", "dtype": dtype})
  hf_configs.write_configs(out_dir, model_cfg, dtype)
  return names


def _looks_like_export(path: str) -> bool:
  names = os.listdir(path)
  return hf_configs.UNIMAGE_CONFIG in names or any(n.endswith(".safetensors") for n in names)


def check_output(out_dir: str, ckpt_dir: str) -> None:
  """Refuses an output folder whose contents an export must not replace (a run, another tool's files)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise OutputExistsError(f"--output {out_dir} is a file, not a folder")
  if os.path.abspath(out_dir) in (os.path.abspath(ckpt_dir), os.path.dirname(os.path.abspath(ckpt_dir))):
    raise OutputExistsError(f"--output {out_dir} is the checkpoint's own folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not _looks_like_export(out_dir):
    raise OutputExistsError(f"--output {out_dir} is not empty and holds no earlier export; choose another folder")


class NoEmaError(UserError, ValueError):
  """An EMA export was asked for but the checkpoint step saved no EMA."""


def export_checkpoint_step(checkpoint: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
                           max_shard_bytes: int | None = None, use_ema: bool = False) -> tuple[int, list[str]]:
  """Orbax checkpoint (trainer format; a workdir or its checkpoints folder) -> safetensors.

  Reads one array at a time from the newest step that reads completely (``step`` exactly when
  given), through the readers' fallback. The files are written to a temporary folder that
  replaces ``out_dir`` only when the whole export succeeded, so a failure leaves the previous
  export untouched and no partial file. ``use_ema`` exports the EMA weights (what BAGEL's release
  ``ema.safetensors`` holds); a step without them is refused. Returns (step, weight file names).
  """
  from unimage_jax.interchange import orbax_io

  ckpt_dir = orbax_io.existing_checkpoint_dir(checkpoint)
  check_output(out_dir, ckpt_dir)

  def attempt(s: int) -> list[str]:
    config = orbax_io.step_config(ckpt_dir, s)
    ckpt = orbax_io.LazyCheckpoint(ckpt_dir, s)
    item = "ema" if use_ema else "params"
    if use_ema and not orbax_io.has_item(ckpt_dir, s, "ema"):
      raise NoEmaError(f"--use_ema: step {s} of {ckpt_dir} saved no EMA (train with config.optim.ema_decay > 0)")
    abstract = (ckpt.metadata(item), ckpt.metadata("tables"))
    with atomic_io.atomic_dir(out_dir) as tmp:
      return export_params(ckpt.tree(item), ckpt.tree("tables"), config.model, tmp, dtype=dtype,
                           abstract=abstract, max_shard_bytes=max_shard_bytes)

  return orbax_io.with_fallback(ckpt_dir, attempt, step=step)


def export_checkpoint(ckpt_dir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
                      max_shard_bytes: int | None = None) -> list[str]:
  """:func:`export_checkpoint_step` without the step: the shard file names."""
  return export_checkpoint_step(ckpt_dir, out_dir, step=step, dtype=dtype, max_shard_bytes=max_shard_bytes)[1]
