"""Foreign weights -> an Orbax checkpoint the trainer restores (``params`` + ``tables`` + config.json).

  # our export or BAGEL's own release: the model's shape comes from the folder (JSONs, then the
  # tensors); --config adds training fields and refuses, with a list, any shape it contradicts
  python tools/import_checkpoint.py --format=bagel --source=exports/tiny --output=runs/imported
  python tools/import_checkpoint.py --format=bagel --source=/ckpt/BAGEL-7B-MoT \
      --config=configs/bagel_7b.py:stage2 --output=runs/bagel_imported
  # a Qwen2/Qwen2.5 LLM (und expert, copied into gen), optionally with SigLIP vision weights
  python tools/import_checkpoint.py --format=qwen2 --source=/ckpt/Qwen2.5-0.5B --config=configs/mot_1b.py \
      --siglip=/ckpt/siglip-so400m-14-980 --output=runs/from_qwen
  # a FLUX / diffusers AutoencoderKL VAE -> <output>/vae (Flax NNX state, Orbax StandardSave)
  python tools/import_checkpoint.py --format=vae --source=/ckpt/FLUX.1-dev/vae --output=runs/vae

Key or shape problems print one list (missing / unexpected / wrong shape) and exit with 2. The
output is written to a temporary folder and renamed into place when complete; a non-empty
--output is refused unless --overwrite is given (then it is replaced, only once the import succeeded).
"""

import os

from absl import flags
from ml_collections import config_flags

from unimage_jax import atomic_io, cli
from unimage_jax.errors import UserError
from unimage_jax.interchange import orbax_io

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (required for qwen2/siglip).")
_FORMAT = flags.DEFINE_enum("format", "bagel", ["bagel", "qwen2", "siglip", "vae"], "Source format.")
_SOURCE = flags.DEFINE_string("source", None, "Source directory or .safetensors file.", required=True)
_SIGLIP = flags.DEFINE_string("siglip", None, "Optional SigLIP vision weights merged after a qwen2/bagel import.")
_BASE = flags.DEFINE_string("base_checkpoint", None, "Orbax checkpoint supplying what the source lacks (default: fresh init).")
_OUTPUT = flags.DEFINE_string("output", None, "Output Orbax CheckpointManager directory.", required=True)
_STEP = flags.DEFINE_integer("step", 0, "Step number to write.")
_SEED = flags.DEFINE_integer("seed", 0, "Init seed for parameters the source lacks.")
_ALLOW_UNEXPECTED = flags.DEFINE_bool("allow_unexpected", False, "Ignore source tensors the model does not use.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output (e.g. an earlier import).")


def _config_for_bagel():
  """The model is what the source folder says (its JSONs, then its tensors' shapes); ``--config``
  supplies the training fields and how the model runs, and may not contradict its shape."""
  from unimage_jax.config_base import base_config
  from unimage_jax.interchange import importers

  if _CONFIG.value is None:
    config = base_config()
    model = importers.bagel_model_config(_SOURCE.value, config.model)
    config.model = model
    return config
  model = importers.bagel_model_config(_SOURCE.value, _CONFIG.value.model)
  return importers.config_for_checkpoint(_CONFIG.value, model, _SOURCE.value)


def _import(output: str):
  from unimage_jax.interchange import importers
  from unimage_jax.model import functional

  kw = dict(allow_unexpected=_ALLOW_UNEXPECTED.value)
  if _FORMAT.value == "bagel":
    config = _config_for_bagel()
    params, tables, _ = importers.import_bagel(_SOURCE.value, config.model, **kw)
  else:
    config = _CONFIG.value
    if _BASE.value:
      loaded = orbax_io.load_checkpoint(_BASE.value, config=config)  # the readers' fallback
      base = (loaded.params, loaded.tables)
    else:
      base = functional.init_params(config.model, _SEED.value)
    if _FORMAT.value == "qwen2":
      params, tables = importers.import_qwen2(_SOURCE.value, config.model, base=base, **kw)
    else:
      params, tables = importers.import_siglip(_SOURCE.value, config.model, base, **kw)
  if _SIGLIP.value:
    params, tables = importers.import_siglip(_SIGLIP.value, config.model, (params, tables), **kw)
  orbax_io.save_params(output, _STEP.value, params, tables, config)


def _import_vae(output: str):
  """The layout ``config.model.vae_path`` reads (``vae.store``: Orbax params + vae_config.json)."""
  from unimage_jax.vae import flux_vae, store

  store.save_vae(flux_vae.import_vae(_SOURCE.value), output)


def check_flags() -> None:
  """Everything the flags decide, before any weight is read."""
  if not os.path.exists(_SOURCE.value):
    raise UserError(f"--source {_SOURCE.value} does not exist")
  if _FORMAT.value in ("qwen2", "siglip") and _CONFIG.value is None:
    raise UserError(f"--format={_FORMAT.value} needs --config (the model to import into)")
  out = _OUTPUT.value
  if os.path.exists(out) and not os.path.isdir(out):
    raise atomic_io.OutputExistsError(f"--output {out} is a file, not a folder")
  if os.path.isdir(out) and os.listdir(out) and not _OVERWRITE.value:
    what = "a training run" if orbax_io.run_steps(out) else "files"
    raise atomic_io.OutputExistsError(f"--output {out} is not empty (it holds {what}); choose an empty folder, "
                                      "or pass --overwrite to replace it")
  if _BASE.value and os.path.abspath(_BASE.value) == os.path.abspath(out):
    raise UserError("--base_checkpoint and --output are the same folder; write the import elsewhere")


def main(argv):
  del argv
  check_flags()
  with atomic_io.atomic_dir(_OUTPUT.value) as tmp:  # replaces --output only once the import succeeded
    _import_vae(tmp) if _FORMAT.value == "vae" else _import(tmp)
  print(f"wrote {_OUTPUT.value} (step {_STEP.value})")


if __name__ == "__main__":
  cli.run(main)
