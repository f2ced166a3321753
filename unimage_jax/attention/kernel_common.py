"""What the Pallas attention kernels share: metadata encoding, in-tile mask, backward tile math, VJP.

Both backends (``pallas_tpu.py``: Mosaic, ``pallas_gpu.py``: Triton) compute the same function on
the same operands. Metadata travels as ``[B, 4, L]`` int32 rows (:func:`pack_meta`): the sample
(padding replaced by a sentinel that matches nothing on the other side), the segment, the order
and, for keys, a kind code (causal / full / noise), so the mask of a tile is
:func:`layout.visibility_rule` on a few integer comparisons (:func:`tile_mask`). The tile lists
come from :mod:`block_summary` (:func:`kernel_meta`). The gradient is flash-attention style
(:data:`flash`, a ``custom_vjp`` over a backend's :class:`Kernels`): the backward kernels recompute
each tile's probabilities from the saved logsumexp with :func:`dq_tile` and :func:`dkv_tile`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from unimage_jax import layout
from unimage_jax.attention import block_summary as bs
from unimage_jax.attention.reference import checked_defaults
from unimage_jax.layout import TokenMeta

MASK_VALUE = -1e30  # finite, so that fully masked rows never produce inf - inf
_PAD_Q_SAMPLE = np.iinfo(np.int32).min
_PAD_K_SAMPLE = np.iinfo(np.int32).min + 1

# Row indices of the packed metadata operand, and the rows each side uses.
SAMPLE, SEGMENT, ORDER, KCODE = 0, 1, 2, 3
QUERY_ROWS = (SAMPLE, SEGMENT, ORDER)
KEY_ROWS = (SAMPLE, SEGMENT, ORDER, KCODE)
# k-side kind codes
CODE_CAUSAL, CODE_FULL, CODE_NOISE = 0, 1, 2


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_meta(meta: TokenMeta, length: int) -> TokenMeta:
  """Pads metadata ``[B, L]`` to ``length`` with padding tokens (kind PAD, sample -1)."""
  pad = length - meta[0].shape[-1]
  if pad == 0:
    return TokenMeta(*(jnp.asarray(x, jnp.int32) for x in meta))
  fills = (-1, -1, layout.KIND_PAD, 0)
  return TokenMeta(*(jnp.pad(jnp.asarray(x, jnp.int32), ((0, 0), (0, pad)), constant_values=f)
                     for x, f in zip(meta, fills)))


def pack_meta(meta: TokenMeta, *, side: str) -> jax.Array:
  """``[B, 4, L]`` int32 kernel metadata: sample (padding -> a sentinel that matches nothing on
  the other side), segment, order and, for keys, a kind code (causal / full / noise)."""
  s, g, kind, o = (jnp.asarray(x, jnp.int32) for x in meta)
  pad = kind == layout.KIND_PAD
  sentinel = _PAD_Q_SAMPLE if side == "q" else _PAD_K_SAMPLE
  s = jnp.where(pad, sentinel, s)
  code = jnp.where(kind == layout.KIND_NOISE, CODE_NOISE,
                   jnp.where(layout.is_full_kind(kind), CODE_FULL, CODE_CAUSAL))
  return jnp.stack([s, g, o, code.astype(jnp.int32)], axis=1)


def plan(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int):
  """Tile classes and the forward / transposed block lists for padded metadata."""
  classes = bs.classify_meta(q_meta, k_meta, block_q, block_k)
  return classes, bs.block_lists(classes), bs.block_lists(jnp.swapaxes(classes, 1, 2))


def check_self_attention(q: jax.Array, k: jax.Array, q_meta: TokenMeta,
                         k_meta: TokenMeta | None, scale: float | None) -> tuple[TokenMeta, float]:
  """The kernels' arguments (q ``[B, L, Hq, D]``, k ``[B, L, Hkv, D]``): self-attention lengths
  and :func:`reference.checked_defaults`; returns (key metadata, scale)."""
  lq, lk = q.shape[1], k.shape[1]
  if lq != lk:
    raise ValueError(f"self-attention kernel needs Lq == Lk, got {lq} and {lk}")
  return checked_defaults(q, k, q_meta, k_meta, scale)


def kernel_meta(q_meta: TokenMeta, k_meta: TokenMeta, length: int, block_q: int, block_k: int):
  """(q metadata, k metadata ``[B, 4, length]``, forward lists, transposed lists) for rows padded
  with padding tokens to ``length``."""
  q_meta, k_meta = pad_meta(q_meta, length), pad_meta(k_meta, length)
  _, fwd_lists, bwd_lists = plan(q_meta, k_meta, block_q, block_k)
  return pack_meta(q_meta, side="q"), pack_meta(k_meta, side="k"), fwd_lists, bwd_lists


# --------------------------------------------------------------------------------------------
# Inside the kernels
# --------------------------------------------------------------------------------------------


def _precision(dtype):
  """fp32 operands get exact fp32 matmuls (Mosaic fp32 contraction / Triton IEEE); bf16 the
  native MXU / tensor-core path."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nt(a, b):
  """a @ b.T with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(a.dtype))


def dot_nn(a, b):
  """a @ b with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(a.dtype))


def meta_fields(ref, rows, index=slice(None), *, axis: int) -> tuple:
  """Rows ``rows`` of a ``[4, n]`` metadata ref at ``index``, each shaped to run along ``axis``
  of a 2-D tile: ``[n, 1]`` (axis 0, sublanes) or ``[1, n]`` (axis 1, lanes)."""
  expand = (lambda x: x[:, None]) if axis == 0 else (lambda x: x[None, :])
  return tuple(expand(ref[r, index]) for r in rows)


def query_fields(ref, index=slice(None), *, axis: int = 0) -> tuple:
  """(sample, segment, order) of a query block; queries run along tile axis 0 unless transposed."""
  return meta_fields(ref, QUERY_ROWS, index, axis=axis)


def key_fields(ref, index=slice(None), *, axis: int = 1) -> tuple:
  """(sample, segment, order, kind code) of a key block; keys run along tile axis 1 unless
  transposed."""
  return meta_fields(ref, KEY_ROWS, index, axis=axis)


def tile_mask(q_fields: tuple, k_fields: tuple) -> jax.Array:
  """The visibility of a tile from :func:`query_fields` and :func:`key_fields` (padding handled
  by the sample sentinels).

  Every operand is broadcast to the tile shape before comparing, and only elementwise logic on
  the resulting booleans follows (Mosaic lowers this well; no boolean broadcasts or selects).
  """
  shape = jnp.broadcast_shapes(q_fields[0].shape, k_fields[0].shape)
  qs, qg, qo, ks, kg, ko, kc = (jnp.broadcast_to(x, shape) for x in (*q_fields, *k_fields))
  return layout.visibility_rule(qs == ks, qg == kg, ko <= qo, kc != CODE_CAUSAL, kc != CODE_NOISE)


def masked_by(mask: jax.Array | None) -> Callable[[jax.Array], jax.Array]:
  """Zeroes hidden entries of a probability tile (the identity on FULL tiles: ``mask=None``)."""
  return (lambda p: p) if mask is None else (lambda p: jnp.where(mask, p, 0.0))


def dq_tile(q, k, v, do, lse, di, hide, scale):
  """dQ contribution of one tile: q/do ``[bq, D]``, k/v ``[bk, D]``, lse/di ``[bq, 1]``; ``hide``
  zeroes the probabilities of hidden pairs."""
  p = hide(jnp.exp(dot_nt(q, k) * scale - lse))  # [bq, bk]
  ds = p * (dot_nt(do, v) - di) * scale
  return dot_nn(ds.astype(k.dtype), k)


def dkv_tile(q, k, v, do, lse, di, hide, scale):
  """(dK, dV) contributions of one transposed tile (keys in sublanes, queries in lanes): q/do
  ``[bq, D]``, k/v ``[bk, D]``, lse/di ``[1, bq]``."""
  pt = hide(jnp.exp(dot_nt(k, q) * scale - lse))  # [bk, bq]
  dv = dot_nn(pt.astype(do.dtype), do)
  dst = pt * (dot_nt(v, do) - di) * scale
  return dot_nn(dst.astype(q.dtype), q), dv


# --------------------------------------------------------------------------------------------
# custom_vjp over a backend's kernel layout
# --------------------------------------------------------------------------------------------


class Kernels(NamedTuple):
  """A backend's kernel calls on its kernel-layout operands; ``options`` are static keywords
  (scale, block sizes, interpret)."""

  forward: Callable  # (q, k, v, qm, km, fwd_lists, **options) -> (o, logsumexp)
  backward: Callable  # (q, k, v, qm, km, o, lse, do, fwd_lists, bwd_lists, **options) -> dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def flash(q, k, v, qm, km, fwd_lists, bwd_lists, kernels: Kernels, options: tuple):
  """Attention output of ``kernels``, differentiable in q, k, v; ``options``: (name, value) pairs."""
  return kernels.forward(q, k, v, qm, km, fwd_lists, **dict(options))[0]


def _flash_fwd(q, k, v, qm, km, fwd_lists, bwd_lists, kernels, options):
  o, lse = kernels.forward(q, k, v, qm, km, fwd_lists, **dict(options))
  return o, (q, k, v, qm, km, fwd_lists, bwd_lists, o, lse)


def _flash_bwd(kernels, options, res, do):
  q, k, v, qm, km, fwd_lists, bwd_lists, o, lse = res
  dq, dk, dv = kernels.backward(q, k, v, qm, km, o, lse, do, fwd_lists, bwd_lists, **dict(options))
  zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), tree)
  return dq, dk, dv, zeros(qm), zeros(km), zeros(fwd_lists), zeros(bwd_lists)


flash.defvjp(_flash_fwd, _flash_bwd)
