"""Encodes a built split's keyframes with the config's VAE into the offline latent cache (ArrayRecord).

  python tools/cache_latents.py --config=configs/tiny_vae.py
  python tools/cache_latents.py --config=configs/mot_1b.py --config.model.vae_path=runs/flux_vae --split=train

Resumable: finished shards are kept and only the missing ones are encoded (rerun after an
interruption). A cache that another VAE, image size or build made is refused unless
``--overwrite`` rebuilds it. The trainer builds the train split's cache itself on first use; this
tool does it ahead of time (e.g. once per dataset on one host) and for other splits.
"""

import time

from absl import flags
from ml_collections import config_flags

from unimage_jax import cli
from unimage_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_vae.py", "Experiment config (a flux_vae model).")
_SPLIT = flags.DEFINE_string("split", "train", "Split of the built dataset to encode.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Keyframes per VAE forward (one compile).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a cache made by another VAE / image size / build.")


def main(argv):
  del argv
  from data_pipelines import latent_cache, pipeline

  config = _CONFIG.value
  if config.model.autoencoder != "flux_vae":
    raise UserError(f"config.model.autoencoder={config.model.autoencoder!r}: only a flux_vae model uses a latent cache")
  if _SPLIT.value == "train":
    pipeline.ensure_dataset(config)  # default data / tokenizer / StoryWorld VAE on first use, then the cache
  start = time.time()
  directory, counts = latent_cache.build_for_config(config, _SPLIT.value, overwrite=_OVERWRITE.value,
                                                    batch=_BATCH.value)
  print(f"latent cache {directory}: {counts['shards']} shard(s), {counts['encoded']} encoded now, "
        f"{counts['kept']} kept, {time.time() - start:.1f}s")


if __name__ == "__main__":
  cli.run(main)
