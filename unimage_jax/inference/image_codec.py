"""Keyframe pixels <-> latent tokens for the director, behind one interface: the exact pixel codec
(the tiny config) or the FLUX VAE (the real path, ``unimage_jax/vae/store.py``).

Both take any uint8 image (resized to ``config.data.image_size`` as the planner resizes) and give
``[grid*grid, D]`` tokens, so the director never asks which autoencoder it runs.
"""

from __future__ import annotations

from typing import Protocol

import ml_collections
import numpy as np

from unimage_jax import pixel_codec
from unimage_jax.choices import AUTOENCODERS
from unimage_jax.config_validation import latent_downsample
from unimage_jax.errors import UserError
from unimage_jax.images import resize
from unimage_jax.inference.storyboard import DirectorError
from unimage_jax.vae import store


class ImageCodec(Protocol):
  grid: int  # latent patches per side

  def encode(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> latent tokens [grid*grid, D]."""

  def decode(self, tokens) -> np.ndarray:
    """Latent tokens [grid*grid, D] -> uint8 [S, S, 3]."""


class PixelCodec:
  """The parameter-free pixel codec (``unimage_jax/pixel_codec.py``)."""

  def __init__(self, image_size: int, downsample: int, patch: int):
    self.image_size, self.downsample, self.patch = image_size, downsample, patch
    self.grid = image_size // (downsample * patch)

  def encode(self, image: np.ndarray) -> np.ndarray:
    tokens, _, _ = pixel_codec.image_to_tokens(resize(image, self.image_size), self.downsample, self.patch)
    return tokens

  def decode(self, tokens) -> np.ndarray:
    return pixel_codec.tokens_to_image(np.asarray(tokens), self.grid, self.grid, self.downsample, self.patch)


class VaeCodec:
  """The VAE's jitted encoder/decoder (``vae``: a batch-1 :class:`store.Codec`)."""

  def __init__(self, vae: store.Codec, image_size: int, downsample: int):
    self.vae, self.image_size = vae, image_size
    self.grid = image_size // (downsample * vae.patch)

  def encode(self, image: np.ndarray) -> np.ndarray:
    return self.vae.encode(resize(image, self.image_size)[None])[0]

  def decode(self, tokens) -> np.ndarray:
    return self.vae.decode(np.asarray(tokens, np.float32)[None], self.grid, self.grid)[0]


def load_vae(config: ml_collections.ConfigDict):
  """The config's VAE, checked against the model and image size it must serve."""
  try:
    return store.load_for_config(config)
  except UserError as e:
    raise DirectorError(str(e)) from None


def for_config(config: ml_collections.ConfigDict, vae=None) -> ImageCodec:
  """The codec ``config.model.autoencoder`` names (``vae``: an already loaded VAE, else the config's)."""
  m = config.model
  size = config.data.image_size
  if m.autoencoder == "flux_vae":
    vae = vae if vae is not None else load_vae(config)
    return VaeCodec(store.Codec(vae, m.latent_patch_size, batch=1), size, latent_downsample(m))
  if m.autoencoder != "pixel":
    raise DirectorError(f"config.model.autoencoder={m.autoencoder!r} must be {' or '.join(map(repr, AUTOENCODERS))}")
  return PixelCodec(size, latent_downsample(m), m.latent_patch_size)
