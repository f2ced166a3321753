"""Our params -> BAGEL-layout safetensors shards + config JSONs, one tensor at a time.

Used by ``tools/export_torch.py``. The sources are anything ``keymap.export_one`` can index: real
numpy/JAX trees, or :class:`orbax_io.LazyTree` views that restore one array on demand, which keeps
peak host memory near the largest array instead of the model.
"""

from __future__ import annotations

import ml_collections
import ml_dtypes
import numpy as np

from unimage_jax.interchange import hf_configs, keymap, safetensors_io

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def export_params(params, tables, model_cfg: ml_collections.ConfigDict, out_dir: str, *,
                  dtype: str = "float32", abstract=None, max_shard_bytes: int = 5 << 30) -> list[str]:
  """Writes every mapped tensor (floating ones cast to ``dtype``) and the config JSONs.

  ``abstract`` is ``(abstract_params, abstract_tables)``; computed from ``model_cfg`` when absent.
  Returns the shard file names.
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


def export_checkpoint(ckpt_dir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
                      max_shard_bytes: int = 5 << 30) -> list[str]:
  """Orbax checkpoint (trainer format) -> safetensors, restoring one array at a time."""
  from unimage_jax.interchange import orbax_io

  config = orbax_io.load_config_json(ckpt_dir)
  ckpt = orbax_io.LazyCheckpoint(ckpt_dir, step)
  abstract = (ckpt.metadata("params"), ckpt.metadata("tables"))
  return export_params(ckpt.tree("params"), ckpt.tree("tables"), config.model, out_dir, dtype=dtype,
                       abstract=abstract, max_shard_bytes=max_shard_bytes)
