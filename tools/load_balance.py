"""Per-shard attention work of context-parallel rows, contiguous vs zig-zag slots (host side).

  python tools/load_balance.py                 # the README table (sequence 4 and 8)
  python tools/load_balance.py --shards=8 --block=256

Rows are StoryWorld-like stories (a prompt, then per shot a script, the keyframe's noised latents
and its clean copy), packed first-fit into the two buffers, then split as the train step splits
them (``model/row_shards.py``), with and without the zig-zag slot permutation
(``unimage_jax/slot_layout.py``). Prints, per layout, the visible pairs and the kernels' non-empty
tiles of the busiest shard over the mean (1.00 = even) and the total tiles (skipping lost to the
permutation shows up there); then the attention FLOPs of one row (bagel_7b: 28 layers, 28 heads
of 128) that the kernels' block skipping removes.
"""

from absl import flags

_SHARDS = flags.DEFINE_list("shards", ["4", "8"], "sequence axis sizes to measure")
_BLOCK = flags.DEFINE_integer("block", 512, "kernel tile side (query and key blocks)")

# (name, stories' shots, latent side in patches, und_len, gen_len); 512 px = 32 x 32 latent patches
ROWS = [
    ("StoryWorld-like: 4-shot stories at 256 px, 16k row", 4, 16, 4096, 12288),
    ("bagel_7b today: 2-shot fragments at 512 px, 16k row", 2, 32, 12288, 4096),
    ("12-shot story at 512 px (stage1_long rows)", 12, 32, 4096, 24576),
    ("12-shot story at 1024 px (stage1_long_1024 rows)", 12, 64, 8192, 98304),
]


def measure(shots, side, und_len, gen_len, shards, block):
  import numpy as np
  from unimage_jax import layout, slot_layout
  from unimage_jax.attention import load_balance
  from unimage_jax.model import row_shards
  from unimage_jax.testing import layouts
  story = layouts.storyworld_sample(shots=shots, prompt=300 if shots >= 12 else 120, script=100, side=side)
  su, sg, _, _ = layout.sample_lengths(story)
  n = min(und_len // su, gen_len // sg)
  row = layout.pack_row([story] * n, layout.BufferSizes(und_len, gen_len, 0, 10**6), 1, 1 << 10, 1)
  out = {"stories": n, "fill": (n * (su + sg)) / (und_len + gen_len)}
  order = row_shards.join_slots(und_len, gen_len, shards)
  for name in slot_layout.SLOT_LAYOUTS:
    r = slot_layout.permute_row(row, shards, name)
    meta = layout.TokenMeta(*(np.concatenate([u, g])[order] for u, g in zip(layout.token_meta(r, "und"),
                                                                              layout.token_meta(r, "gen"))))
    w = load_balance.shard_work(meta, shards, block, block)
    out[name] = {"pairs": load_balance.imbalance(w["pairs"]), "tiles": load_balance.imbalance(w["tiles"]),
                 "total_tiles": int(w["tiles"].sum()), "total_pairs": int(w["pairs"].sum())}
  length = und_len + gen_len
  out["all_tiles"] = shards * (-(-(length // shards) // block)) * (-(-length // block))
  return out


def attention_tflops(tiles: int, block: int, layers=28, heads=28, head_dim=128) -> float:
  """fwd + bwd attention TFLOPs of one row (bagel_7b shapes): per tile and head, the forward's 2
  matmuls and the backward's 5 (S recomputed, dP, dV, dQ, dK), each 2 * block^2 * head_dim."""
  return tiles * 7 * 2 * block * block * head_dim * heads * layers / 1e12


def main(argv):
  del argv
  print("| row | tokens | S | stories | contiguous: pairs max/mean | tiles max/mean | zig-zag: pairs max/mean "
        "| tiles max/mean | zig-zag tiles vs contiguous (total) |")
  print("|---|---|---|---|---|---|---|---|---|")
  skipping = []
  for name, shots, side, lu, lg in ROWS:
    for s in (int(x) for x in _SHARDS.value):
      m = measure(shots, side, lu, lg, s, _BLOCK.value)
      c, z = m["contiguous"], m["zigzag"]
      print(f"| {name} | {lu + lg:,} | {s} | {m['stories']} | {c['pairs']:.2f} | {c['tiles']:.2f} | {z['pairs']:.2f} "
            f"| {z['tiles']:.2f} | {z['total_tiles'] / c['total_tiles']:.2f} |", flush=True)
      skipping.append((name, lu + lg, s, m))
  print()
  print(f"| row | S | tiles computed (zig-zag) of all | attention fwd+bwd TFLOPs per row, dense | with skipping "
        f"| removed by skipping |")
  print("|---|---|---|---|---|---|")
  b = _BLOCK.value
  for name, length, s, m in skipping:
    dense, kept = attention_tflops(m["all_tiles"], b), attention_tflops(m["zigzag"]["total_tiles"], b)
    print(f"| {name} | {s} | {m['zigzag']['total_tiles']:,} of {m['all_tiles']:,} | {dense:,.1f} | {kept:,.1f} "
          f"| {1 - kept / dense:.0%} |")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)
