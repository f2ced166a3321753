"""Trains the small FLUX-architecture VAE on StoryWorld keyframes and saves it where a config reads it.

  python tools/train_vae.py --config=configs/tiny_vae.py            # -> config.model.vae_path
  python tools/train_vae.py --config=configs/tiny_vae.py --steps=1000 --output=artifacts/vae/longer

The architecture is FLUX's (4 levels, 8x down, 16 latent channels) at narrow widths
(``unimage_jax.vae.training.TINY``); the normalisation constants are measured on the training
latents. Prints the reconstruction PSNR on held-out validation keyframes.
"""

from absl import flags
from ml_collections import config_flags

from unimage_jax import cli
from unimage_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_vae.py", "Experiment config (its data).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default: config.model.vae_path).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps (batch 16).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing VAE folder.")


def main(argv):
  del argv
  import os

  from data_pipelines import builders, pipeline
  from unimage_jax import atomic_io
  from unimage_jax.vae import store, training

  config = _CONFIG.value
  out = _OUTPUT.value or config.model.vae_path
  if not out:
    raise UserError("--output is empty and so is config.model.vae_path")
  if os.path.exists(out) and not _OVERWRITE.value:
    raise atomic_io.OutputExistsError(f"--output {out} exists; pass --overwrite to replace it")
  try:
    builders.find_dataset_dir(config.data.data_dir, config.data.dataset, config.data.dataset_config,
                              pipeline.default_build_name(config))
  except builders.DatasetNotBuiltError:
    if config.data.dataset != "storyworld":
      raise
    builders.build_storyworld(config.data.data_dir, config.data.num_stories, config.data.image_size, seed=0)
  images = training.keyframes(config, "train", limit=4096)
  vae, metrics = training.train_vae(images, training.TINY, steps=_STEPS.value)
  held_out = training.keyframes(config, "validation", limit=256)
  psnr = training.reconstruction_psnr(vae, held_out, config.model.latent_patch_size)
  with atomic_io.atomic_dir(out) as tmp:
    store.save_vae(vae, tmp)
  print(f"VAE {metrics}; validation PSNR {psnr:.2f} dB over {len(held_out)} keyframes -> {out}")


if __name__ == "__main__":
  cli.run(main)
