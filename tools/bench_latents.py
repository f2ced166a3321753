"""Keyframe latents: in-step VAE encoding against the offline ArrayRecord cache, in one run.

  python tools/bench_latents.py --config=configs/tiny_vae.py --stories=64

Both sides produce the same tokens for the same stories (checked): (a) *in-step*: the frozen VAE
encoder, jitted at a fixed batch, over the stories' keyframes, which an in-step design pays on every
step a story is drawn; (b) *cache*: reading those stories' latents back from the cache (what the
pipeline does per sample). The one-time cost of writing the cache is (a) once per keyframe.
Prints milliseconds per keyframe for each and their ratio; measures, asserts nothing about speed.
"""

import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from unimage_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_vae.py", "A flux_vae config.")
_STORIES = flags.DEFINE_integer("stories", 64, "Stories whose keyframes are encoded / read.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Keyframes per VAE forward.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes (the best is reported).")


def main(argv):
  del argv
  from data_pipelines import builders, latent_cache, pipeline
  from unimage_jax.images import resize
  from unimage_jax.vae import store

  config = _CONFIG.value
  pipeline.ensure_dataset(config)
  d = config.data
  source = builders.load_source(d.data_dir, d.dataset, "train", d.dataset_config, pipeline.default_build_name(config))
  n = min(_STORIES.value, len(source))
  vae = latent_cache.load_checked_vae(config)
  codec = store.Codec(vae, config.model.latent_patch_size, batch=_BATCH.value)
  cache = latent_cache.open_for_config(config, source, "train", vae=vae).cache
  frames = [np.stack([resize(f, d.image_size) for f in builders.decode_record(source[i])["keyframes"]])
            for i in range(n)]
  count = sum(len(f) for f in frames)
  codec.encode(frames[0])  # compile

  def in_step():
    return [codec.encode(f) for f in frames]

  def cached():
    return [cache[i]["tokens"] for i in range(n)]

  a, b = in_step(), cached()
  err = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
  times = {}
  for name, fn in (("in-step VAE encode", in_step), ("latent cache read", cached)):
    best = float("inf")
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    times[name] = best / count * 1e3
  import jax
  print(f"{n} stories, {count} keyframes at {d.image_size}px, VAE {vae.config.block_out_channels}, "
        f"{jax.devices()[0].platform}; max |cache - encode| = {err:.2e}")
  for name, ms in times.items():
    print(f"  {name}: {ms:.3f} ms / keyframe")
  print(f"  ratio in-step / cache: {times['in-step VAE encode'] / times['latent cache read']:.1f}x")


if __name__ == "__main__":
  cli.run(main)
