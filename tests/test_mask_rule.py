"""The generalized causal rule of docs/ARCHITECTURE.md §3, checked against hand-written matrices."""

import numpy as np
import jax.numpy as jnp

from unimage_jax import layout
from unimage_jax.attention import visibility

SIZES = layout.BufferSizes(und_len=16, gen_len=8, vit_len=4, max_segments=8)
LATENT = np.zeros((2, 4), np.float32)
S, E = 3, 4  # marker ids


def _logical(samples):
  """Packs samples; returns (visibility in logical order, positions in logical order, row)."""
  row = layout.pack_row(samples, SIZES, latent_dim=4, latent_grid=4, vit_patch_dim=3)
  cat = lambda name: np.concatenate([row[f"und_{name}"], row[f"gen_{name}"]])
  meta = layout.TokenMeta(cat("sample_ids"), cat("segment_ids"), cat("segment_kinds"), cat("orders"))
  valid = meta.segment_kinds != layout.KIND_PAD
  idx = np.where(valid)[0]
  idx = idx[np.argsort(meta.orders[idx])]
  vis = np.asarray(visibility(layout.TokenMeta(*(jnp.asarray(x) for x in meta)),
                              layout.TokenMeta(*(jnp.asarray(x) for x in meta))))
  return vis, idx, cat("positions"), row


def _matrix(rows):
  return np.array([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_text_is_causal():
  vis, idx, pos, _ = _logical([[layout.TextSegment(np.array([10, 11, 12]))]])
  np.testing.assert_array_equal(vis[np.ix_(idx, idx)], _matrix(["100", "110", "111"]))
  np.testing.assert_array_equal(pos[idx], [0, 1, 2])


def test_noised_image_hidden_from_later_tokens_clean_copy_visible():
  sample = [
      layout.TextSegment(np.array([10, 11])),
      layout.ImageSegment(LATENT, 1, 2, True, S, E),
      layout.ImageSegment(LATENT, 1, 2, False, S, E),
      layout.TextSegment(np.array([12])),
  ]
  vis, idx, pos, _ = _logical([sample])
  expected = _matrix([
      "10 0000 0000 0",  # t0
      "11 0000 0000 0",  # t1
      "11 1111 0000 0",  # noised image (start marker, 2 latents, end marker): full inside
      "11 1111 0000 0",
      "11 1111 0000 0",
      "11 1111 0000 0",
      "11 0000 1111 0",  # clean copy: sees text and itself, never the noised image
      "11 0000 1111 0",
      "11 0000 1111 0",
      "11 0000 1111 0",
      "11 0000 1111 1",  # later text sees the clean copy only
  ])
  np.testing.assert_array_equal(vis[np.ix_(idx, idx)], expected)
  # one position per image; +0 after the noised image, +1 after the clean one
  np.testing.assert_array_equal(pos[idx], [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3])


def test_vit_image_is_full_and_advances_position():
  sample = [
      layout.TextSegment(np.array([10])),
      layout.VitSegment(np.zeros((2, 3), np.float32), 1, 2, S, E),
      layout.TextSegment(np.array([11])),
  ]
  vis, idx, pos, row = _logical([sample])
  expected = _matrix(["1 0000 0", "1 1111 0", "1 1111 0", "1 1111 0", "1 1111 0", "1 1111 1"])
  np.testing.assert_array_equal(vis[np.ix_(idx, idx)], expected)
  np.testing.assert_array_equal(pos[idx], [0, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(row["vit_dest"][:2], [2, 3])  # ViT tokens sit between the markers


def test_samples_and_padding_are_isolated():
  a = [layout.TextSegment(np.array([10, 11]))]
  b = [layout.TextSegment(np.array([12, 13]))]
  row = layout.pack_row([a, b], SIZES, latent_dim=4, latent_grid=4, vit_patch_dim=3)
  meta = layout.TokenMeta(*(jnp.asarray(row[f"und_{n}"]) for n in ("sample_ids", "segment_ids", "segment_kinds", "orders")))
  vis = np.asarray(visibility(meta, meta))
  expected = np.zeros((16, 16), bool)
  expected[:2, :2] = _matrix(["10", "11"])
  expected[2:4, 2:4] = _matrix(["10", "11"])
  np.testing.assert_array_equal(vis, expected)  # padding rows and columns (4..15) are all False
  np.testing.assert_array_equal(row["und_positions"][:4], [0, 1, 0, 1])  # positions restart per sample


def test_noise_segment_hidden_even_from_same_sample_noise_of_other_image():
  sample = [layout.ImageSegment(LATENT, 1, 2, True, S, E), layout.ImageSegment(LATENT, 1, 2, True, S, E)]
  vis, idx, _, _ = _logical([sample])
  expected = np.zeros((8, 8), bool)
  expected[:4, :4] = True
  expected[4:, 4:] = True
  np.testing.assert_array_equal(vis[np.ix_(idx, idx)], expected)


def test_labels_predict_next_token_within_trained_text():
  sample = [layout.TextSegment(np.array([10, 11, 12])), layout.TextSegment(np.array([13, 14]), train=False)]
  row = layout.pack_row([sample], SIZES, latent_dim=4, latent_grid=4, vit_patch_dim=3)
  np.testing.assert_array_equal(row["und_labels"][:5], [11, 12, -1, -1, -1])
  np.testing.assert_array_equal(row["und_loss_weights"][:5], [1, 1, 0, 0, 0])


def test_overflow_names_the_buffer():
  big = [layout.TextSegment(np.arange(20))]
  try:
    layout.pack_row([big], SIZES, latent_dim=4, latent_grid=4, vit_patch_dim=3)
  except layout.RowOverflowError as e:
    assert "und" in str(e) and "20" in str(e)
  else:
    raise AssertionError("expected RowOverflowError")
