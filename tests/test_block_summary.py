"""The tile classification is exact where it claims anything: EMPTY tiles have no visible pair,
FULL tiles have only visible pairs (checked against the reference ``visibility``)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unimage_jax.attention import block_summary as bs
from unimage_jax.testing import layouts
from unimage_jax.attention.reference import visibility
from unimage_jax.layout import TokenMeta


def _check(meta: TokenMeta, bq: int, bk: int):
  classes = np.asarray(bs.classify_meta(meta, meta, bq, bk))
  vis = np.asarray(visibility(meta, meta))
  b, l, _ = vis.shape
  tiles = vis.reshape(b, l // bq, bq, l // bk, bk).transpose(0, 1, 3, 2, 4)
  any_vis = tiles.any(axis=(-1, -2))
  all_vis = tiles.all(axis=(-1, -2))
  assert not np.any(any_vis & (classes == bs.EMPTY)), "a skipped tile has a visible pair"
  assert not np.any(~all_vis & (classes == bs.FULL)), "a mask-free tile has a masked pair"
  return classes, any_vis


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans(),
       blocks=st.sampled_from([(8, 8), (8, 16), (16, 8), (32, 32)]))
def test_classification_is_exact(seed, shuffle, blocks):
  rng = np.random.default_rng(seed)
  meta = layouts.random_batch_meta(rng, 2, 96, 64, shuffle=shuffle)
  _check(meta, *blocks)


def test_tight_on_sorted_rows():
  """On unshuffled packed rows most tiles are decided: tiles called PARTIAL mostly have work."""
  meta = layouts.random_batch_meta(np.random.default_rng(1), 2, 96, 64, max_samples=8)
  classes, any_vis = _check(meta, 16, 16)
  assert np.sum(classes == bs.EMPTY) > 0
  assert np.sum((classes == bs.PARTIAL) & ~any_vis) <= 0.25 * np.sum(classes == bs.PARTIAL)


def test_storyworld_row_skips_most_tiles():
  meta, _ = layouts.storyworld_row_meta(8192)
  frac = bs.skipped_fraction(bs.classify_meta(meta, meta, 256, 256))
  assert frac["skipped"] > 0.6
  _check(TokenMeta(*(x[:, :2048] for x in meta)), 128, 128)


def test_block_lists():
  classes = np.array([[[0, 2, 1, 0], [0, 0, 0, 0], [1, 1, 1, 2]]], np.int32)
  lists = bs.block_lists(classes)
  np.testing.assert_array_equal(lists.count, [[2, 0, 4]])
  np.testing.assert_array_equal(lists.index, [[[1, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3]]])
  np.testing.assert_array_equal(lists.full, [[[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]])


def test_summary_rejects_ragged_length():
  meta = layouts.random_batch_meta(np.random.default_rng(0), 1, 10, 5)
  with pytest.raises(ValueError):
    bs.summarize(meta, 4)
