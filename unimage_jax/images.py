"""uint8 keyframe preparation shared by the planner, the director and the VAE tools.

Why one home: a training sample and the director's context image must be resized and cut into
ViT patches the same way, or the model sees at inference pixels it never saw in training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] (box filter when shrinking: exact for flat colours)."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BOX), np.uint8)


def vit_patches(image: np.ndarray, patch: int) -> tuple[np.ndarray, int, int]:
  """uint8 [H, W, 3] -> normalised pixels [h*w, p*p*3] in (p, p, c) order, h, w."""
  x = image.astype(np.float32) / 127.5 - 1.0
  h, w = image.shape[0] // patch, image.shape[1] // patch
  x = x[: h * patch, : w * patch].reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4)
  return x.reshape(h * w, patch * patch * 3), h, w
