"""Slot layouts for context parallelism: the zig-zag permutation changes work per shard, not results."""

import jax
import jax.numpy as jnp
import numpy as np

from unimage_jax import layout, losses, slot_layout, synthetic
from unimage_jax.attention import load_balance
from unimage_jax.attention.reference import visibility
from unimage_jax.model import functional, row_shards
from unimage_jax.testing import layouts


def test_visible_keys_match_the_dense_mask():
  rng = np.random.default_rng(0)
  for _ in range(3):
    meta = layouts.random_batch_meta(rng, 1, 96, 64, shuffle=True)
    dense = np.asarray(visibility(meta, meta))[0].sum(axis=1)
    row = layout.TokenMeta(*(x[0] for x in meta))
    np.testing.assert_array_equal(load_balance.visible_keys(row), dense)


def test_zigzag_gives_shard_i_chunks_i_and_2s_minus_1_minus_i():
  perm = slot_layout.shard_order(16, 4, "zigzag")
  assert perm.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
  assert (slot_layout.shard_order(16, 4, "contiguous") == np.arange(16)).all()


def test_zigzag_evens_the_work_of_a_whole_story_row():
  story = layouts.storyworld_sample(shots=12, prompt=64, script=32, side=8)
  row = layout.pack_row([story], layout.BufferSizes(512, 1536, 0, 10**6), 1, 64, 1)
  order = row_shards.join_slots(512, 1536, 4)
  work = {}
  for name in slot_layout.SLOT_LAYOUTS:
    r = slot_layout.permute_row(row, 4, name)
    meta = layout.TokenMeta(*(np.concatenate([u, g])[order] for u, g in zip(layout.token_meta(r, "und"),
                                                                              layout.token_meta(r, "gen"))))
    work[name] = load_balance.shard_work(meta, 4, 64, 64)
  assert work["contiguous"]["pairs"].sum() == work["zigzag"]["pairs"].sum()  # same pairs, other shards
  assert load_balance.imbalance(work["contiguous"]["pairs"]) > 1.4
  assert load_balance.imbalance(work["zigzag"]["pairs"]) < 1.1
  assert load_balance.imbalance(work["zigzag"]["tiles"]) < load_balance.imbalance(work["contiguous"]["tiles"])


def test_permuted_slots_give_the_same_text_loss(tiny_config):
  """CE sees no noise (text never attends to noised latents), so it is exact under any slot order;
  the ViT tokens land in their remapped slots."""
  c = tiny_config
  c.data.batch_size = 2
  c.model.num_layers = 1
  batch = synthetic.random_batch(c, seed=1)
  c.mesh.sequence = 4
  c.data.slot_layout = "zigzag"
  zig = synthetic.random_batch(c, seed=1)
  assert not np.array_equal(zig["und_token_ids"], batch["und_token_ids"])
  assert np.array_equal(np.sort(zig["und_token_ids"], 1), np.sort(batch["und_token_ids"], 1))
  mdef = functional.model_def(c.model)
  params, tables = functional.init_params(c.model, 0)

  @jax.jit
  def ce(b):
    s = losses.loss_sums(mdef.bind(params, tables), b, jax.random.key(1), c.model, c.data.max_segments)
    return s.ce_sum, s.ce_weight

  (a, wa), (z, wz) = ce(jax.tree.map(jnp.asarray, batch)), ce(jax.tree.map(jnp.asarray, zig))
  np.testing.assert_allclose(float(z), float(a), rtol=1e-5)
  assert float(wz) == float(wa) > 0
