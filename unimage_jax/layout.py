"""The packed-row layout: the one contract between data, model, attention kernel and director.

Why two buffers. Mixture-of-Transformers routing is hard (by token kind), so a row is stored as
two physical buffers with static lengths: an *und* buffer of ``Lu`` slots (text tokens, image
markers and ViT tokens; served by the understanding expert) and a *gen* buffer of ``Lg`` slots
(VAE latent tokens, noised and clean; served by the generation expert). Each expert runs densely
on its own buffer, so no expert ever computes a token it does not own and every shape is static.
Attention runs once over the concatenation ``[und | gen]`` (length ``L = Lu + Lg``); which key a
query may see is decided by four int32 metadata arrays per token, never by buffer position:

* ``sample_ids``   which story/sample of the packed row the token belongs to (``-1`` = padding)
* ``segment_ids``  unique id (within the row) of the token's segment; an image segment spans both
                   buffers: its start/end markers live in the und buffer, its latents in gen
* ``segment_kinds`` one of the ``KIND_*`` constants below
* ``orders``       the token's index in the row's logical order (sample after sample)

Visibility (docs/ARCHITECTURE.md §3, "generalized causal attention"; :func:`visible`)::

    allowed(q, k) = q, k not padding AND same sample
                    AND (order[k] <= order[q] OR (same segment AND kind[k] is full/noise))
                    AND NOT (kind[k] == NOISE AND segment[k] != segment[q])

RoPE positions (``positions``) follow BAGEL: per sample from 0, consecutive for text, one shared
position for all tokens of an image (markers included); +1 after a ViT or clean image, +0 after a
noised one.

A sample is a list of segments (:class:`TextSegment`, :class:`ImageSegment`, :class:`VitSegment`);
:func:`pack_row` writes samples into one row. First-fit packing of many samples into rows lives in
``data_pipelines``; this module only owns the encoding so that every producer agrees on it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

# Segment kinds. PAD must be 0 so that zero-initialised buffers are padding.
KIND_PAD = 0
KIND_TEXT = 1  # causal
KIND_VIT = 2  # full inside the segment
KIND_CLEAN = 3  # clean VAE latents, full inside the segment
KIND_NOISE = 4  # noised VAE latents, full inside, invisible to every token outside it
FULL_KINDS = (KIND_VIT, KIND_CLEAN, KIND_NOISE)

IGNORE_LABEL = -1


class TokenMeta(NamedTuple):
  """Per-token int32 metadata that decides attention visibility. Each field is ``[B, L]``."""

  sample_ids: np.ndarray
  segment_ids: np.ndarray
  segment_kinds: np.ndarray
  orders: np.ndarray


def is_full_kind(kinds):
  """Whether each kind is one of ``FULL_KINDS`` (its tokens see their whole segment), elementwise
  on numpy, jax or torch integer arrays."""
  full = kinds == FULL_KINDS[0]
  for kind in FULL_KINDS[1:]:
    full = full | (kinds == kind)
  return full


def visibility_rule(same_sample, same_segment, key_not_later, key_full, key_open):
  """The visibility rule above on boolean pair predicates: the one place where it is written (the
  NOISE exclusion is folded into the causal term: a noise key is seen in its own segment only).

  ``same_sample``: neither token is padding and both belong to one sample; ``same_segment``;
  ``key_not_later``: ``order[k] <= order[q]``; ``key_full``: the key's kind is full
  (:func:`is_full_kind`); ``key_open``: the key may be seen from outside its segment (its kind is
  not NOISE). Plain ``&`` and ``|`` only, so the rule runs on numpy, jax (the reference and the
  Pallas kernels' tiles) and torch (``torch_serving``) booleans alike, and it is monotone in every
  predicate: bounds of the predicates over a block of pairs bound the rule over the block
  (``attention/block_summary.py``).
  """
  return same_sample & ((key_not_later & (same_segment | key_open)) | (same_segment & key_full))


def visible(q: TokenMeta, k: TokenMeta):
  """Which (query, key) pairs may attend: :func:`visibility_rule` from metadata whose query and
  key fields broadcast against each other (e.g. ``[..., Lq, 1]`` and ``[..., 1, Lk]``)."""
  same_sample = ((q.segment_kinds != KIND_PAD) & (k.segment_kinds != KIND_PAD)
                 & (q.sample_ids == k.sample_ids))
  return visibility_rule(same_sample, q.segment_ids == k.segment_ids, k.orders <= q.orders,
                         is_full_kind(k.segment_kinds), k.segment_kinds != KIND_NOISE)


@dataclasses.dataclass(frozen=True)
class BufferSizes:
  """Static sizes of one packed row."""

  und_len: int  # Lu: text + markers + ViT tokens
  gen_len: int  # Lg: VAE latent tokens
  vit_len: int  # Nv: ViT patch tokens (a subset of the und buffer's slots)
  max_segments: int  # segment ids of a row are in [0, max_segments)


@dataclasses.dataclass
class TextSegment:
  """Text tokens (control tokens included). ``train``: predict each next token of the segment.

  ``label_weights[i]`` scales the loss of predicting token ``i + 1`` (None: all 1), so a planner
  can stress the few tokens a task hinges on (``data.name_loss_weight``) without a new loss.
  """

  token_ids: np.ndarray  # [n] int
  train: bool = True
  label_weights: np.ndarray | None = None  # [n] float


@dataclasses.dataclass
class ImageSegment:
  """A VAE-latent image wrapped by start/end marker tokens.

  ``latents`` are patchified latent tokens ``[h*w, D]`` in row-major patch order; ``grid_width``
  is the full latent-position grid side G, so patch (r, c) gets latent position ``r*G + c``.
  """

  latents: np.ndarray  # [h*w, D] float
  height: int  # h, in patches
  width: int  # w, in patches
  noised: bool
  start_token: int
  end_token: int
  loss_weights: np.ndarray | None = None  # [h*w] flow-loss weight per token (noised only); None = 1


@dataclasses.dataclass
class VitSegment:
  """An understanding (ViT) image wrapped by start/end marker tokens; patches are raw pixels."""

  patches: np.ndarray  # [h*w, p*p*3] float, flattened in (p, p, c) order
  height: int
  width: int
  start_token: int
  end_token: int


Segment = TextSegment | ImageSegment | VitSegment


def segment_lengths(segment: Segment) -> tuple[int, int, int]:
  """Slots a segment takes in the (und, gen, vit) buffers."""
  if isinstance(segment, TextSegment):
    return len(segment.token_ids), 0, 0
  if isinstance(segment, ImageSegment):
    return 2, segment.height * segment.width, 0
  n = segment.height * segment.width
  return n + 2, 0, n


def sample_lengths(sample: Sequence[Segment]) -> tuple[int, int, int, int]:
  """(und, gen, vit, segments) a sample needs; used by first-fit packing."""
  und = gen = vit = 0
  for seg in sample:
    u, g, v = segment_lengths(seg)
    und, gen, vit = und + u, gen + g, vit + v
  return und, gen, vit, len(sample)


def empty_row(sizes: BufferSizes, latent_dim: int, vit_patch_dim: int) -> dict[str, np.ndarray]:
  """An all-padding row (numpy) with every field of the batch contract."""
  lu, lg, nv = sizes.und_len, sizes.gen_len, sizes.vit_len
  i32 = lambda n: np.zeros([n], np.int32)
  row = {
      "und_token_ids": i32(lu),
      "und_labels": np.full([lu], IGNORE_LABEL, np.int32),
      "und_loss_weights": np.zeros([lu], np.float32),
      "gen_latents": np.zeros([lg, latent_dim], np.float32),
      "gen_latent_pos": i32(lg),
      "gen_loss_weights": np.zeros([lg], np.float32),
      "vit_patches": np.zeros([nv, vit_patch_dim], np.float32),
      "vit_pos_ids": i32(nv),
      "vit_image_ids": np.full([nv], -1, np.int32),
      "vit_dest": np.full([nv], lu, np.int32),  # out of range => dropped by the scatter
  }
  for prefix, n in (("und", lu), ("gen", lg)):
    row[f"{prefix}_sample_ids"] = np.full([n], -1, np.int32)
    row[f"{prefix}_segment_ids"] = np.full([n], -1, np.int32)
    row[f"{prefix}_segment_kinds"] = np.full([n], KIND_PAD, np.int32)
    row[f"{prefix}_orders"] = i32(n)
    row[f"{prefix}_positions"] = i32(n)
  return row


class RowOverflowError(ValueError):
  """A sample does not fit the row's static buffers."""


def pack_row(
    samples: Sequence[Sequence[Segment]],
    sizes: BufferSizes,
    latent_dim: int,
    latent_grid: int,
    vit_patch_dim: int,
    vit_grid: int = 70,
    sqrt_length_loss_weighting: bool = False,
) -> dict[str, np.ndarray]:
  """Encodes whole samples into one row of the batch contract (numpy, host side).

  Raises RowOverflowError naming the buffer that overflows; callers plan with sample_lengths.
  """
  row = empty_row(sizes, latent_dim, vit_patch_dim)
  u = g = v = 0  # fill pointers of the three buffers
  order = 0
  segment_id = 0
  vit_image = 0
  for sample_id, sample in enumerate(samples):
    need_u, need_g, need_v, need_s = sample_lengths(sample)
    for name, used, need, cap in (
        ("und", u, need_u, sizes.und_len),
        ("gen", g, need_g, sizes.gen_len),
        ("vit", v, need_v, sizes.vit_len),
        ("segments", segment_id, need_s, sizes.max_segments),
    ):
      if used + need > cap:
        raise RowOverflowError(
            f"sample {sample_id} needs {need} {name} slots but only {cap - used} of {cap} are free"
        )
    n_labels = sum(len(s.token_ids) - 1 for s in sample if isinstance(s, TextSegment) and s.train)
    weight = 1.0 / np.sqrt(max(n_labels, 1)) if sqrt_length_loss_weighting else 1.0
    position = 0

    def put_und(token: int, kind: int, pos: int) -> int:
      nonlocal u, order
      slot = u
      row["und_token_ids"][slot] = token
      row["und_sample_ids"][slot] = sample_id
      row["und_segment_ids"][slot] = segment_id
      row["und_segment_kinds"][slot] = kind
      row["und_orders"][slot] = order
      row["und_positions"][slot] = pos
      u += 1
      order += 1
      return slot

    for seg in sample:
      if isinstance(seg, TextSegment):
        ids = np.asarray(seg.token_ids, np.int64)
        label_weights = np.ones(len(ids)) if seg.label_weights is None else np.asarray(seg.label_weights)
        if label_weights.shape != ids.shape:
          raise ValueError(f"sample {sample_id}: {label_weights.shape} label weights for {len(ids)} tokens")
        for i, tok in enumerate(ids):
          slot = put_und(int(tok), KIND_TEXT, position + i)
          if seg.train and i + 1 < len(ids):
            row["und_labels"][slot] = int(ids[i + 1])
            row["und_loss_weights"][slot] = weight * label_weights[i]
        position += len(ids)
      elif isinstance(seg, ImageSegment):
        kind = KIND_NOISE if seg.noised else KIND_CLEAN
        if seg.height > latent_grid or seg.width > latent_grid:
          raise RowOverflowError(
              f"latent image {seg.height}x{seg.width} exceeds the latent grid {latent_grid}"
          )
        put_und(seg.start_token, kind, position)
        n = seg.height * seg.width
        rows_, cols = np.divmod(np.arange(n), seg.width)
        sl = slice(g, g + n)
        row["gen_latents"][sl] = seg.latents
        row["gen_latent_pos"][sl] = rows_ * latent_grid + cols
        if seg.noised:
          w = np.ones(n, np.float32) if seg.loss_weights is None else np.asarray(seg.loss_weights, np.float32)
          if w.shape != (n,):
            raise ValueError(f"sample {sample_id}: {w.shape} flow-loss weights for {n} latent tokens")
          row["gen_loss_weights"][sl] = w
        row["gen_sample_ids"][sl] = sample_id
        row["gen_segment_ids"][sl] = segment_id
        row["gen_segment_kinds"][sl] = kind
        row["gen_orders"][sl] = order + np.arange(n)
        row["gen_positions"][sl] = position
        g += n
        order += n
        put_und(seg.end_token, kind, position)
        position += 0 if seg.noised else 1
      else:
        put_und(seg.start_token, KIND_VIT, position)
        n = seg.height * seg.width
        rows_, cols = np.divmod(np.arange(n), seg.width)
        dest = np.arange(u, u + n)
        for slot in dest:
          put_und(0, KIND_VIT, position)
        sl = slice(v, v + n)
        row["vit_patches"][sl] = seg.patches
        row["vit_pos_ids"][sl] = rows_ * vit_grid + cols
        row["vit_image_ids"][sl] = vit_image
        row["vit_dest"][sl] = dest
        v += n
        vit_image += 1
        put_und(seg.end_token, KIND_VIT, position)
        position += 1
      segment_id += 1
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Batches rows: every field gains a leading [B] axis."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def token_meta(batch, prefix: str) -> TokenMeta:
  """The TokenMeta of one buffer (``prefix`` is ``und`` or ``gen``)."""
  return TokenMeta(
      batch[f"{prefix}_sample_ids"],
      batch[f"{prefix}_segment_ids"],
      batch[f"{prefix}_segment_kinds"],
      batch[f"{prefix}_orders"],
  )
