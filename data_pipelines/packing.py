"""First-fit packing of planned samples into the model's static rows, as a checkpointable Grain op.

Why online first-fit with a few open rows. A sample needs slots in four budgets at once (und, gen,
vit, segments; ``layout.sample_lengths``). Keeping ``num_open_rows`` rows open and putting each
sample into the first one where all four fit fills rows well (>90% on StoryWorld) while keeping
latency and memory bounded. A row is closed when it is nearly full, when a sample fits no open row
and no new row may be opened (the fullest row is closed), or when its oldest sample has waited
``max_age`` samples.

Why this state. Grain iterator state must be small and JSON-able, so it never holds arrays: it
holds the parent state from before the oldest sample still waiting in a row, and for every sample
read since then which open/ready row it sits in (-1: already emitted). Restoring re-reads that
short stretch and rebuilds the rows exactly, so the next batches are bit-identical.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np

from unimage_jax import layout, slot_layout
from unimage_jax.layout import BufferSizes

Lengths = tuple[int, int, int, int]  # (und, gen, vit, segments)


@dataclasses.dataclass
class _Bin:
  members: list[tuple[int, int]]  # (sample index, variant), in arrival order
  used: list[int]  # [und, gen, vit, segments]


def _tokens(lengths: Lengths) -> int:
  return lengths[0] + lengths[1]


class FirstFitPacker:
  """Pure bookkeeping over sample lengths; knows nothing of arrays (easy to test and replay).

  Each sample offers variants (longest first). Placement: (1) first open row where the full
  variant fits; else (2) the open row and shorter variant that fill the most, if that variant
  keeps at least ``min_keep`` of the sample's tokens (a row tail is filled with a story cut at a
  shot boundary instead of padding); else (3) a new row (closing the fullest when
  ``num_open_rows`` are open).
  """

  def __init__(self, sizes: BufferSizes, num_open_rows: int = 8, max_age: int = 64,
               close_fill: float = 0.985, min_keep: float = 0.5):
    self.caps = [sizes.und_len, sizes.gen_len, sizes.vit_len, sizes.max_segments]
    self.num_open_rows = num_open_rows
    self.max_age = max_age
    self.close_fill = close_fill
    self.min_keep = min_keep
    self.bins: list[_Bin] = []

  def fill(self, b: _Bin) -> float:
    """Fraction of the row's token slots (und + gen) in use."""
    return (b.used[0] + b.used[1]) / (self.caps[0] + self.caps[1])

  def _fits(self, b: _Bin, lengths: Lengths) -> bool:
    return all(u + n <= c for u, n, c in zip(b.used, lengths, self.caps))

  def check(self, index: int, lengths: Lengths) -> None:
    for name, need, cap in zip(("und", "gen", "vit", "segments"), lengths, self.caps):
      if need > cap:
        raise layout.RowOverflowError(f"sample {index} needs {need} {name} slots but a row has {cap}")

  def add(self, index: int, variants: Sequence[Lengths]) -> list[list[tuple[int, int]]]:
    """Places sample ``index``; returns the rows (lists of (index, variant)) closed by this step."""
    self.check(index, variants[-1])
    closed: list[list[tuple[int, int]]] = []
    choice = next(((b, 0) for b in self.bins if self._fits(b, variants[0])), None)
    if choice is None:
      best = -1
      for b in self.bins:
        for v in range(1, len(variants)):
          if _tokens(variants[v]) < self.min_keep * _tokens(variants[0]):
            break
          if self._fits(b, variants[v]):
            gain = _tokens(variants[v])
            if gain > best:
              best, choice = gain, (b, v)
            break
    if choice is None:
      if len(self.bins) >= self.num_open_rows:
        fullest = max(self.bins, key=self.fill)
        self.bins.remove(fullest)
        closed.append(fullest.members)
      choice = (_Bin([], [0, 0, 0, 0]), 0)
      self.bins.append(choice[0])
    target, v = choice
    target.members.append((index, v))
    target.used = [u + n for u, n in zip(target.used, variants[v])]
    for b in list(self.bins):
      if self.fill(b) >= self.close_fill or index - b.members[0][0] >= self.max_age:
        self.bins.remove(b)
        closed.append(b.members)
    return closed

  def restore(self, bins: Sequence[Sequence[Sequence[int]]], lengths: dict[int, Sequence[Lengths]]) -> None:
    self.bins = []
    for members in bins:
      b = _Bin([(int(i), int(v)) for i, v in members], [0, 0, 0, 0])
      for i, v in b.members:
        b.used = [u + n for u, n in zip(b.used, lengths[i][v])]
      self.bins.append(b)


class RowEncoder:
  """Samples -> one row dict of the batch contract (``layout.empty_row`` keys)."""

  def __init__(self, sizes: BufferSizes, latent_dim: int, latent_grid: int, vit_patch_dim: int,
               vit_grid: int = 70, sqrt_length_loss_weighting: bool = False, sequence_shards: int = 1,
               slot_layout: str = "contiguous"):
    self.sizes, self.latent_dim, self.latent_grid = sizes, latent_dim, latent_grid
    self.vit_patch_dim, self.vit_grid, self.sqrt = vit_patch_dim, vit_grid, sqrt_length_loss_weighting
    # context parallelism: which slots each sequence shard holds (unimage_jax/slot_layout.py)
    self.sequence_shards, self.slot_layout = sequence_shards, slot_layout

  def __call__(self, samples: Sequence[Sequence[layout.Segment]]) -> dict[str, np.ndarray]:
    row = layout.pack_row(samples, self.sizes, self.latent_dim, self.latent_grid, self.vit_patch_dim,
                          self.vit_grid, sqrt_length_loss_weighting=self.sqrt)
    return slot_layout.permute_row(row, self.sequence_shards, self.slot_layout)


def row_efficiency(row: dict[str, np.ndarray]) -> float:
  """Non-padding tokens / all tokens of a row (or batch) over the und and gen buffers."""
  used = np.sum(row["und_sample_ids"] >= 0) + np.sum(row["gen_sample_ids"] >= 0)
  return float(used) / float(row["und_sample_ids"].size + row["gen_sample_ids"].size)


class PackIterDataset(grain.IterDataset):
  """Grain op: an IterDataset of samples with ``.variants`` -> IterDataset of packed rows."""

  def __init__(self, parent: grain.IterDataset, sizes: BufferSizes, encoder: RowEncoder,
               num_open_rows: int = 8, max_age: int = 64, min_keep: float = 0.5,
               get_variants: Callable[[Any], Sequence[Sequence[layout.Segment]]] = lambda s: s.variants):
    super().__init__(parent)
    self._sizes, self._encoder = sizes, encoder
    self._num_open_rows, self._max_age, self._min_keep = num_open_rows, max_age, min_keep
    self._get_variants = get_variants

  def __iter__(self) -> "PackDatasetIterator":
    return PackDatasetIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"PackIterDataset(sizes={self._sizes}, open_rows={self._num_open_rows})"


class PackDatasetIterator(grain.DatasetIterator):
  """Emits rows in the order they close; state = parent anchor + row membership (no arrays)."""

  def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._reset()

  def _reset(self) -> None:
    ds = self._ds
    self._packer = FirstFitPacker(ds._sizes, ds._num_open_rows, ds._max_age, min_keep=ds._min_keep)
    self._ready: collections.deque[list[tuple[int, int]]] = collections.deque()
    self._samples: dict[int, Sequence[Sequence[layout.Segment]]] = {}
    self._lengths: dict[int, list[Lengths]] = {}
    self._before: dict[int, Any] = {}  # parent state before reading sample i (live samples only)
    self._next = 0
    self._exhausted = False

  def _read_one(self) -> bool:
    before = self._parent.get_state()
    try:
      element = next(self._parent)
    except StopIteration:
      return False
    i = self._next
    self._next += 1
    self._keep(i, element, before)
    self._ready.extend(self._packer.add(i, self._lengths[i]))
    return True

  def _keep(self, i: int, element: Any, before: Any) -> None:
    variants = self._ds._get_variants(element)
    self._samples[i], self._before[i] = variants, before
    self._lengths[i] = [layout.sample_lengths(v) for v in variants]

  def _forget(self, members: Sequence[tuple[int, int]]) -> None:
    for i, _ in members:
      self._samples.pop(i), self._lengths.pop(i), self._before.pop(i)

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._ready and not self._exhausted:
      if not self._read_one():
        self._exhausted = True
        self._ready.extend(b.members for b in self._packer.bins)
        self._packer.bins = []
    if not self._ready:
      raise StopIteration
    members = self._ready.popleft()
    row = self._ds._encoder([self._samples[i][v] for i, v in members])
    self._forget(members)
    return row

  def get_state(self) -> dict[str, Any]:
    live = [m for m in self._ready] + [b.members for b in self._packer.bins]
    live_ids = [i for m in live for i, _ in m]
    if live_ids:
      anchor = min(live_ids)
      parent_state = self._before[anchor]
    else:
      anchor, parent_state = self._next, self._parent.get_state()
    return {
        "parent": parent_state,
        "anchor": anchor,
        "next": self._next,
        "ready": [[list(x) for x in m] for m in self._ready],
        "open": [[list(x) for x in b.members] for b in self._packer.bins],
        "exhausted": self._exhausted,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._reset()
    self._parent.set_state(state["parent"])
    keep = {i for m in state["ready"] + state["open"] for i, _ in m}
    for i in range(state["anchor"], state["next"]):
      before = self._parent.get_state()
      element = next(self._parent)
      if i in keep:
        self._keep(i, element, before)
    self._next = state["next"]
    self._ready = collections.deque([(int(i), int(v)) for i, v in m] for m in state["ready"])
    self._packer.restore(state["open"], self._lengths)
    self._exhausted = state["exhausted"]
