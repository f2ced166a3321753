"""Random packed rows for tests and benchmarks: every segment kind, several samples per row.

Samples are drawn so the row exercises the whole layout (text, noised and clean latents, ViT
images, padding); they are not meant to be learnable data. Why not ``unimage_jax/testing/layouts.py``'s
generator: these are whole model inputs (token ids, latents, ViT patches, sized by the config) in the
order a real story has them, while that one draws metadata-only rows in arbitrary segment orders
to stress the attention mask.
"""

from __future__ import annotations

import numpy as np
import ml_collections

from unimage_jax import config_validation, layout, slot_layout
from unimage_jax.model.unimage import latent_token_dim

# Marker ids used by synthetic samples (any ids < vocab_size work for the model).
IM_START, IM_END, VISION_START, VISION_END = 1, 2, 3, 4


def random_sample(rng: np.random.Generator, cfg: ml_collections.ConfigDict, *, max_text: int = 12,
                  max_images: int = 2, vit: bool = True) -> list[layout.Segment]:
  """One sample: text, then (noised image, clean copy) pairs and an optional ViT image."""
  m = cfg.model
  dl = latent_token_dim(m)
  segs: list[layout.Segment] = []

  def text():
    n = int(rng.integers(3, max_text + 1))
    body = rng.integers(5, m.vocab_size, size=n - 2)
    segs.append(layout.TextSegment(np.concatenate([[IM_START], body, [IM_END]])))

  text()
  for _ in range(int(rng.integers(0, max_images + 1))):
    h = int(rng.integers(1, min(3, m.max_latent_grid) + 1))
    w = int(rng.integers(1, min(3, m.max_latent_grid) + 1))
    lat = rng.standard_normal((h * w, dl)).astype(np.float32)
    segs.append(layout.ImageSegment(lat, h, w, True, VISION_START, VISION_END))
    segs.append(layout.ImageSegment(lat, h, w, False, VISION_START, VISION_END))
    text()
  if vit and m.vit.enabled and rng.random() < 0.5:
    p = m.vit.patch_size
    h, w = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    segs.append(layout.VitSegment(rng.uniform(-1, 1, (h * w, p * p * 3)).astype(np.float32), h, w,
                                  VISION_START, VISION_END))
    text()
  return segs


def random_batch(cfg: ml_collections.ConfigDict, seed: int = 0, samples_per_row: int = 3,
                 **sample_kw) -> dict[str, np.ndarray]:
  """``cfg.data.batch_size`` rows, each packed with up to ``samples_per_row`` random samples."""
  rng = np.random.default_rng(seed)
  d, m = cfg.data, cfg.model
  sizes = layout.BufferSizes(d.und_len, d.gen_len, d.vit_len, d.max_segments)
  rows = []
  for _ in range(d.batch_size):
    samples = []
    used = np.zeros(4, int)
    for _ in range(samples_per_row):
      s = random_sample(rng, cfg, **sample_kw)
      need = np.array(layout.sample_lengths(s))
      if np.all(used + need <= [sizes.und_len, sizes.gen_len, sizes.vit_len, sizes.max_segments]):
        samples.append(s)
        used += need
    row = layout.pack_row(samples, sizes, latent_token_dim(m), m.max_latent_grid, m.vit.patch_size**2 * 3,
                          m.vit.max_patches_per_side, d.sqrt_length_loss_weighting)
    rows.append(slot_layout.permute_row(row, max(int(cfg.mesh.get("sequence", 1)), 1),
                                        config_validation.slot_layout(d)))
  return layout.stack_rows(rows)
