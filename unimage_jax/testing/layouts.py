"""Synthetic packed-row metadata for attention tests and benchmarks (built with layout.pack_row).

Rows are the real two-buffer layout ``[und | gen]``: text, image markers and ViT tokens in the
und buffer, VAE latents (noised and clean) in the gen buffer, several samples per row, padding at
the end of each buffer. Why not ``unimage_jax/synthetic.py``'s generator: that one draws model inputs
(ids, latents) in a real story's order for the synthetic data source, while this one draws only
the layout, in any segment order (a noised image without its clean copy, ViT images anywhere), to
stress the attention mask (the attention tests and benchmarks draw their rows here).
"""

from __future__ import annotations

import numpy as np

from unimage_jax import layout
from unimage_jax.layout import TokenMeta


def _text(n):
  return layout.TextSegment(np.zeros([n], np.int32))


def _image(h, w, noised):
  return layout.ImageSegment(np.zeros([h * w, 1], np.float32), h, w, noised, 1, 2)


def _vit(h, w):
  return layout.VitSegment(np.zeros([h * w, 1], np.float32), h, w, 3, 4)


def row_meta(samples, und_len: int, gen_len: int) -> TokenMeta:
  """TokenMeta ``[L = und_len + gen_len]`` (numpy int32) of one packed row of ``samples``."""
  sizes = layout.BufferSizes(und_len, gen_len, vit_len=und_len, max_segments=10**6)
  row = layout.pack_row(samples, sizes, latent_dim=1, latent_grid=1 << 10, vit_patch_dim=1)
  und = layout.token_meta(row, "und")
  gen = layout.token_meta(row, "gen")
  return TokenMeta(*(np.concatenate([u, g]).astype(np.int32) for u, g in zip(und, gen)))


def random_sample(rng: np.random.Generator, max_text: int = 12, max_side: int = 4):
  """A random interleaved sample: text, ViT images, noised and clean VAE images."""
  segs = []
  for _ in range(int(rng.integers(1, 6))):
    r = rng.random()
    if r < 0.4:
      segs.append(_text(int(rng.integers(1, max_text + 1))))
    elif r < 0.6:
      segs.append(_vit(int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1))))
    else:
      h, w = (int(x) for x in rng.integers(1, max_side + 1, size=2))
      noised = bool(rng.random() < 0.5)
      segs.append(_image(h, w, noised))
      if noised and rng.random() < 0.5:  # the clean copy that later tokens see
        segs.append(_image(h, w, False))
  return segs


def random_row_meta(rng: np.random.Generator, und_len: int, gen_len: int,
                    max_samples: int = 6, **sample_kw) -> TokenMeta:
  """First-fit: random samples are added while they fit; the rest of the row is padding."""
  samples = []
  u = g = 0
  for _ in range(max_samples):
    s = random_sample(rng, **sample_kw)
    nu, ng, _, _ = layout.sample_lengths(s)
    if u + nu <= und_len and g + ng <= gen_len:
      samples.append(s)
      u, g = u + nu, g + ng
  return row_meta(samples, und_len, gen_len)


def random_batch_meta(rng: np.random.Generator, batch: int, und_len: int, gen_len: int,
                      shuffle: bool = False, **kw) -> TokenMeta:
  """``[B, L]`` metadata; ``shuffle`` permutes token slots (visibility must not depend on them)."""
  rows = []
  for _ in range(batch):
    m = random_row_meta(rng, und_len, gen_len, **kw)
    if shuffle:
      perm = rng.permutation(und_len + gen_len)
      m = TokenMeta(*(x[perm] for x in m))
    rows.append(m)
  return TokenMeta(*(np.stack(f) for f in zip(*rows)))


def storyworld_sample(shots: int = 4, prompt: int = 120, script: int = 80, side: int = 16,
                      vit_side: int = 0):
  """A StoryWorld-like multi-shot story: a prompt, then per shot a script, the keyframe as a
  noised latent image and its clean copy (seen by later shots); optional ViT reference image."""
  segs = [_text(prompt)]
  if vit_side:
    segs.append(_vit(vit_side, vit_side))
  for _ in range(shots):
    segs += [_text(script), _image(side, side, True), _image(side, side, False)]
  return segs


def storyworld_row_meta(length: int, shots: int = 4, side: int = 16, prompt: int = 120,
                        script: int = 80, vit_side: int = 0) -> tuple[TokenMeta, dict]:
  """One packed row of total ``length`` filled with as many StoryWorld-like stories as fit,
  with the und/gen split chosen to fit whole stories; returns (meta [1, L], info)."""
  story = storyworld_sample(shots, prompt, script, side, vit_side)
  su, sg, _, _ = layout.sample_lengths(story)
  n = length // (su + sg)
  if n == 0:
    raise ValueError(f"a story needs {su + sg} tokens, more than the row length {length}")
  und_len = su * n + (length - n * (su + sg)) // 2
  gen_len = length - und_len
  meta = row_meta([story] * n, und_len, gen_len)
  info = {"stories": n, "und_len": und_len, "gen_len": gen_len,
          "tokens_per_story": su + sg, "padding": int(np.sum(meta.segment_kinds == layout.KIND_PAD))}
  return TokenMeta(*(x[None] for x in meta)), info
