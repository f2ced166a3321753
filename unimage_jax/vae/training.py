"""Trains a small FLUX-architecture VAE on StoryWorld keyframes (CPU minutes), for the tiny VAE config.

Why: the real path (FLUX-VAE latents through data, training and the director) must run end to end
on a laptop with no download. FLUX's own VAE is 84M parameters; the same architecture with narrow
levels learns StoryWorld's flat-colour frames in a few hundred steps. Objective as in FLUX/SD
VAEs without the GAN and perceptual terms: pixel MSE of a sampled posterior's decoding plus a small
KL. Afterwards ``shift_factor``/``scaling_factor`` are set from the training latents (mean and
1/std), the role FLUX's 0.1159/0.3611 play for its VAE, so the MoT sees unit-scale latents.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimage_jax.vae import flux_vae, store

# Four levels (8x, like FLUX), narrow: about 0.2M parameters.
TINY = flux_vae.VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16,
                          norm_num_groups=8)


def default_vae_path(config) -> str:
  """Where a StoryWorld VAE is trained on first use: ``<data_dir>/../vae/storyworld_<size>px``."""
  return os.path.join(os.path.dirname(os.path.normpath(config.data.data_dir)), "vae",
                      f"storyworld_{config.data.image_size}px")


def keyframes(config, split: str = "train", limit: int | None = None) -> np.ndarray:
  """uint8 ``[N, S, S, 3]``: the keyframes of a built split at ``config.data.image_size``."""
  from data_pipelines import builders, pipeline
  from unimage_jax.images import resize

  d = config.data
  source = builders.load_source(d.data_dir, d.dataset, split, d.dataset_config, pipeline.default_build_name(config))
  frames = []
  for i in range(len(source)):
    frames += [resize(f, d.image_size) for f in builders.decode_record(source[i])["keyframes"]]
    if limit is not None and len(frames) >= limit:
      break
  return np.stack(frames[:limit])


def train_vae(images: np.ndarray, cfg: flux_vae.VAEConfig = TINY, *, steps: int = 400, batch: int = 16,
              learning_rate: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0,
              log=print) -> tuple[flux_vae.FluxVAE, dict[str, float]]:
  """Trains ``FluxVAE(cfg)`` on uint8 images; returns the VAE (normalisation set) and final metrics."""
  vae = flux_vae.FluxVAE(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(vae, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(learning_rate, steps, 0.1)))
  opt_state = tx.init(params)

  def loss_fn(params, x, key):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode_moments(x)  # [B, h, w, C] each
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    recon = model.decode_raw(z)
    mse = jnp.mean((recon - x) ** 2)
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return mse + kl_weight * kl, (mse, kl)

  @jax.jit
  def step(params, opt_state, x, key):
    (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse, kl

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  start, mse = time.time(), float("nan")
  for i in range(steps):
    x = images[rng.integers(0, len(images), batch)].astype(np.float32) / 127.5 - 1.0
    key, sub = jax.random.split(key)
    params, opt_state, mse, kl = step(params, opt_state, jnp.asarray(x), sub)
    if log and (i % 100 == 0 or i == steps - 1):
      log(f"vae step {i + 1}/{steps}: mse {float(mse):.5f} kl {float(kl):.2f} ({time.time() - start:.0f}s)")
  vae = nnx.merge(graphdef, params, nnx.state(vae, nnx.Not(nnx.Param)))
  # normalisation from the posterior means of (up to) 512 training images
  sample = jnp.asarray(images[:512].astype(np.float32) / 127.5 - 1.0)
  means = np.concatenate([np.asarray(vae.encode_moments(sample[j:j + 64])[0]) for j in range(0, len(sample), 64)])
  shift, scale = float(means.mean()), float(1.0 / max(means.std(), 1e-6))
  vae.config = dataclasses.replace(cfg, shift_factor=shift, scaling_factor=scale)
  return vae, {"mse": float(mse), "shift_factor": shift, "scaling_factor": scale}


def reconstruction_psnr(vae: flux_vae.FluxVAE, images: np.ndarray, patch: int = 2) -> float:
  """PSNR (dB) of encode -> decode through the normalised latents (what the MoT learns to produce)."""
  codec = store.Codec(vae, patch, batch=16)
  tokens = codec.encode(images)
  side = int(round(np.sqrt(tokens.shape[1])))
  back = codec.decode(tokens, side, side)
  mse = np.mean((back.astype(np.float32) - images.astype(np.float32)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def ensure_default_vae(config, verbose: bool = True, steps: int = 400) -> None:
  """Trains and saves the StoryWorld VAE when ``config.model.vae_path`` is the default and missing
  (a fresh clone's first run of ``configs/tiny_vae.py``); any other missing path is an error later."""
  path = config.model.vae_path
  if not path or os.path.exists(path) or os.path.abspath(path) != os.path.abspath(default_vae_path(config)):
    return
  if config.data.dataset != "storyworld":
    return
  images = keyframes(config, "train", limit=4096)
  if verbose:
    print(f"training the StoryWorld VAE ({len(images)} keyframes, {steps} steps) into {path}")
  vae, metrics = train_vae(images, TINY, steps=steps, log=print if verbose else None)
  from unimage_jax import atomic_io
  with atomic_io.atomic_dir(path) as tmp:
    store.save_vae(vae, tmp)
  if verbose:
    print(f"VAE: {metrics} -> {path}")
