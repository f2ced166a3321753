"""The tiny config's "pixel path": an exact, parameter-free stand-in for the FLUX VAE.

Why: a 2-core CPU cannot afford a VAE in every step, and StoryWorld's flat-colour keyframes need
none. Pixels in [-1, 1] are folded space-to-depth by ``downsample`` (like the VAE's 8x, channels
grow to ``3 * downsample**2``) and then patchified 2x2 exactly as BAGEL patchifies VAE latents
(docs/ARCHITECTURE.md §10: ``[C, h*p, w*p] -> [h, w, p, p, C] -> [h*w, p*p*C]``). It is invertible, so
decoding a generated latent is exact, and the latent statistics are those of the images.
"""

from __future__ import annotations

import numpy as np


def pixels_to_latent(image: np.ndarray, downsample: int) -> np.ndarray:
  """uint8 ``[H, W, 3]`` -> float32 latent ``[C, H/d, W/d]`` with ``C = 3*d*d`` in [-1, 1]."""
  h, w, c = image.shape
  if h % downsample or w % downsample:
    raise ValueError(f"image {h}x{w} is not divisible by the pixel downsample {downsample}")
  x = image.astype(np.float32) / 127.5 - 1.0
  x = x.reshape(h // downsample, downsample, w // downsample, downsample, c)
  return x.transpose(1, 3, 4, 0, 2).reshape(downsample * downsample * c, h // downsample, w // downsample)


def latent_to_pixels(latent: np.ndarray, downsample: int) -> np.ndarray:
  """Inverse of :func:`pixels_to_latent`; clips to uint8."""
  ch, hh, ww = latent.shape
  c = ch // (downsample * downsample)
  x = latent.reshape(downsample, downsample, c, hh, ww).transpose(3, 0, 4, 1, 2)
  x = x.reshape(hh * downsample, ww * downsample, c)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def patchify(latent: np.ndarray, patch: int) -> np.ndarray:
  """BAGEL latent patchify: ``[C, h*p, w*p] -> [h*w, p*p*C]`` (row-major patches)."""
  c, hp, wp = latent.shape
  h, w = hp // patch, wp // patch
  x = latent.reshape(c, h, patch, w, patch).transpose(1, 3, 2, 4, 0)  # [h, w, p, p, C]
  return x.reshape(h * w, patch * patch * c)


def unpatchify(tokens: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
  """Inverse of :func:`patchify`: ``[h*w, p*p*C] -> [C, h*p, w*p]``."""
  c = tokens.shape[-1] // (patch * patch)
  x = tokens.reshape(height, width, patch, patch, c).transpose(4, 0, 2, 1, 3)
  return x.reshape(c, height * patch, width * patch)


def image_to_tokens(image: np.ndarray, downsample: int, patch: int) -> tuple[np.ndarray, int, int]:
  """uint8 image -> (latent tokens ``[h*w, D]``, h, w) ready for an ImageSegment."""
  latent = patchify(pixels_to_latent(image, downsample), patch)
  h = image.shape[0] // (downsample * patch)
  w = image.shape[1] // (downsample * patch)
  return latent, h, w


def tokens_to_image(tokens: np.ndarray, height: int, width: int, downsample: int, patch: int) -> np.ndarray:
  """Latent tokens -> uint8 image; inverse of :func:`image_to_tokens`."""
  return latent_to_pixels(unpatchify(np.asarray(tokens, np.float32), height, width, patch), downsample)
