"""Foreign weights -> an Orbax checkpoint the trainer restores (``params`` + ``tables`` + config.json).

  # our export or BAGEL's own release (config from its llm/vit/vae JSONs unless --config is given)
  python tools/import_checkpoint.py --format=bagel --source=exports/tiny --output=runs/imported
  # a Qwen2/Qwen2.5 LLM (und expert, copied into gen), optionally with SigLIP vision weights
  python tools/import_checkpoint.py --format=qwen2 --source=/ckpt/Qwen2.5-0.5B --config=configs/mot_1b.py \
      --siglip=/ckpt/siglip-so400m-14-980 --output=runs/from_qwen
  # a FLUX / diffusers AutoencoderKL VAE -> <output>/vae (Flax NNX state, Orbax StandardSave)
  python tools/import_checkpoint.py --format=vae --source=/ckpt/FLUX.1-dev/vae --output=runs/vae

Key or shape problems print one list (missing / unexpected / wrong shape) and exit non-zero.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from unimage_jax.interchange import orbax_io
from unimage_jax.interchange.keymap import KeyMismatchError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (required for qwen2/siglip).")
_FORMAT = flags.DEFINE_enum("format", "bagel", ["bagel", "qwen2", "siglip", "vae"], "Source format.")
_SOURCE = flags.DEFINE_string("source", None, "Source directory or .safetensors file.", required=True)
_SIGLIP = flags.DEFINE_string("siglip", None, "Optional SigLIP vision weights merged after a qwen2/bagel import.")
_BASE = flags.DEFINE_string("base_checkpoint", None, "Orbax checkpoint supplying what the source lacks (default: fresh init).")
_OUTPUT = flags.DEFINE_string("output", None, "Output Orbax CheckpointManager directory.", required=True)
_STEP = flags.DEFINE_integer("step", 0, "Step number to write.")
_SEED = flags.DEFINE_integer("seed", 0, "Init seed for parameters the source lacks.")
_ALLOW_UNEXPECTED = flags.DEFINE_bool("allow_unexpected", False, "Ignore source tensors the model does not use.")


def _config_for_bagel():
  from unimage_jax.config_base import base_config
  from unimage_jax.interchange import hf_configs

  source_dir = _SOURCE.value if os.path.isdir(_SOURCE.value) else os.path.dirname(_SOURCE.value)
  config = _CONFIG.value if _CONFIG.value is not None else base_config()
  model = hf_configs.model_config_from_dir(source_dir, config.model)
  config.model.update(model.to_dict())
  return config


def _import():
  from unimage_jax.interchange import importers
  from unimage_jax.model import functional

  kw = dict(allow_unexpected=_ALLOW_UNEXPECTED.value)
  if _FORMAT.value == "bagel":
    config = _config_for_bagel()
    params, tables, _ = importers.import_bagel(_SOURCE.value, config.model, **kw)
  else:
    if _CONFIG.value is None:
      raise app.UsageError(f"--format={_FORMAT.value} needs --config (the model to import into)")
    config = _CONFIG.value
    if _BASE.value:
      params, tables, _ = orbax_io.restore_params(_BASE.value, config=config)
      base = (params, tables)
    else:
      base = functional.init_params(config.model, _SEED.value)
    if _FORMAT.value == "qwen2":
      params, tables = importers.import_qwen2(_SOURCE.value, config.model, base=base, **kw)
    else:
      params, tables = importers.import_siglip(_SOURCE.value, config.model, base, **kw)
  if _SIGLIP.value:
    params, tables = importers.import_siglip(_SIGLIP.value, config.model, (params, tables), **kw)
  orbax_io.save_params(_OUTPUT.value, _STEP.value, params, tables, config)


def _import_vae():
  import orbax.checkpoint as ocp
  from flax import nnx

  from unimage_jax.vae import flux_vae

  vae = flux_vae.import_vae(_SOURCE.value)
  path = os.path.abspath(os.path.join(_OUTPUT.value, "vae"))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, nnx.to_pure_dict(nnx.state(vae, nnx.Param)), force=True)
  flux_vae.save_config(vae.config, os.path.join(_OUTPUT.value, "vae_config.json"))


def main(argv):
  del argv
  try:
    _import_vae() if _FORMAT.value == "vae" else _import()
  except KeyMismatchError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  print(f"wrote {_OUTPUT.value} (step {_STEP.value})")


if __name__ == "__main__":
  app.run(main)
