"""Pallas Triton (GPU, e.g. H100) flash attention for the MoT generalized causal mask.

Same function, metadata encoding, block lists and backward tile math as :mod:`pallas_tpu` (both
from :mod:`kernel_common`), organised the Triton way:
one program per (query block, query head, batch row) that loops over *only* the non-empty key
blocks of its list (a dynamic-length ``fori_loop``: skipped blocks cost nothing, not even a grid
step), choosing per tile between the masked and the mask-free body (``lax.cond`` on the FULL
flag). Backward: a dQ kernel with the same loop, and a dK/dV kernel per (key block, key/value
head, batch row) that loops over the G query heads of its group and over the transposed list.

Layout: q/k/v/o stay ``[B, L, H, D]`` (the head axis is squeezed by the BlockSpecs; no
transposes), metadata ``[B, 4, L]``, logsumexp / delta ``[B, Hq, L]``. ``D`` is zero-padded to a
power of two (Triton tile shapes), which changes neither scores nor outputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from unimage_jax.attention import block_summary as bs
from unimage_jax.attention import kernel_common as kc
from unimage_jax.attention.kernel_common import MASK_VALUE, dot_nn, dot_nt
from unimage_jax.layout import TokenMeta

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2


def _listed_call(kernel, lists: bs.BlockLists, *, grid, in_specs, out_specs, out_shape, interpret,
                 name):
  """``pl.pallas_call`` whose last three operands are the tile lists (index, full, count;
  flattened, whole: ``pl.no_block_spec``)."""
  call = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[*in_specs, pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name=name,
  )
  flat = lambda x: x.reshape(-1)
  return lambda *operands: call(*operands, flat(lists.index), flat(lists.full), flat(lists.count))


def _hidden_unless_full(is_full, mask_fn):
  """Zeroes the hidden entries of a probability tile (mask from ``mask_fn()``), skipped on FULL
  tiles."""
  return lambda p: lax.cond(is_full != 0, lambda p: p, lambda p: jnp.where(mask_fn(), p, 0.0), p)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, idx_ref, full_ref, cnt_ref,
                o_ref, lse_ref, *, scale, nq, nk, bq, bk):
  i, b = pl.program_id(0), pl.program_id(2)
  row = b * nq + i
  cnt = cnt_ref[row]
  q = q_ref[...]
  qcols = kc.query_fields(qm_ref)
  d = q.shape[-1]

  def body(t, carry):
    acc, m_prev, l_prev = carry
    j = idx_ref[row * nk + t]
    sl = pl.ds(j * bk, bk)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    s = dot_nt(q, k) * scale

    def masked(s):
      mask = kc.tile_mask(qcols, kc.key_fields(km_ref, sl))
      return jnp.where(mask, s, MASK_VALUE), mask.astype(jnp.float32)

    def unmasked(s):
      return s, jnp.ones_like(s)

    s, keep = lax.cond(full_ref[row * nk + t] != 0, unmasked, masked, s)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None]) * keep
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt, body, init)
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc * jnp.where(seen, 1.0 / safe_l, 0.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


class _QuerySpecs(NamedTuple):
  """BlockSpecs of the forward / dQ calls (grid (nq, Hq, B)): a program's query block and rows,
  and the whole row of K/V and key metadata, which it reads at its listed key blocks."""

  q: pl.BlockSpec  # [bq, D] (q, o, dO, dQ)
  row: pl.BlockSpec  # [bq] (logsumexp, delta)
  qm: pl.BlockSpec  # [4, bq]
  kv: pl.BlockSpec  # [L, D] of the query head's KV head
  km: pl.BlockSpec  # [4, L]


def _query_specs(bq: int, lp: int, d: int, group: int) -> _QuerySpecs:
  return _QuerySpecs(
      q=pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
      row=pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, i)),
      qm=pl.BlockSpec((None, 4, bq), lambda i, h, b: (b, 0, i)),
      kv=pl.BlockSpec((None, lp, None, d), lambda i, h, b: (b, 0, h // group, 0)),
      km=pl.BlockSpec((None, 4, lp), lambda i, h, b: (b, 0, 0)),
  )


def _fwd(q, k, v, qm, km, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, lp, hq, d = q.shape
  nq, nk = lp // bq, lp // bk
  sp = _query_specs(bq, lp, d, hq // k.shape[2])
  return _listed_call(
      functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk), lists,
      grid=(nq, hq, bsz),
      in_specs=[sp.q, sp.kv, sp.kv, sp.qm, sp.km],
      out_specs=[sp.q, sp.row],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, hq, lp), jnp.float32)],
      interpret=interpret,
      name="mot_flash_fwd_gpu",
  )(q, k, v, qm, km)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
               idx_ref, full_ref, cnt_ref, dq_ref, *, scale, nq, nk, bk):
  i, b = pl.program_id(0), pl.program_id(2)
  row = b * nq + i
  cnt = cnt_ref[row]
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  di = di_ref[...][:, None]
  qcols = kc.query_fields(qm_ref)

  def body(t, acc):
    j = idx_ref[row * nk + t]
    sl = pl.ds(j * bk, bk)
    hide = _hidden_unless_full(full_ref[row * nk + t],
                               lambda: kc.tile_mask(qcols, kc.key_fields(km_ref, sl)))
    return acc + kc.dq_tile(q, k_ref[sl, :], v_ref[sl, :], do, lse, di, hide, scale)

  acc = lax.fori_loop(0, cnt, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
                idx_ref, full_ref, cnt_ref, dk_ref, dv_ref, *, scale, nq, nk, bq, bk, group):
  j, b = pl.program_id(0), pl.program_id(2)
  row = b * nk + j
  cnt = cnt_ref[row]
  k = k_ref[...]
  v = v_ref[...]
  kcols = kc.key_fields(km_ref, axis=0)

  def head(g, carry):
    def body(t, carry):
      dk, dv = carry
      i = idx_ref[row * nq + t]
      sl = pl.ds(i * bq, bq)
      hide = _hidden_unless_full(full_ref[row * nq + t],
                                 lambda: kc.tile_mask(kc.query_fields(qm_ref, sl, axis=1), kcols))
      ddk, ddv = kc.dkv_tile(q_ref[sl, g, :], k, v, do_ref[sl, g, :], lse_ref[g, sl][None, :],
                             di_ref[g, sl][None, :], hide, scale)
      return dk + ddk, dv + ddv

    return lax.fori_loop(0, cnt, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qm, km, o, lse, do, fwd_lists, bwd_lists, *, scale, bq, bk, interpret):
  bsz, lp, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  di = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
  sp = _query_specs(bq, lp, d, group)
  dq = _listed_call(
      functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk, bk=bk), fwd_lists,
      grid=(nq, hq, bsz),
      in_specs=[sp.q, sp.kv, sp.kv, sp.qm, sp.km, sp.q, sp.row, sp.row],
      out_specs=sp.q,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      name="mot_flash_dq_gpu",
  )(q, k, v, qm, km, do, lse, di)
  # dK/dV: a program owns one key block of one key/value head and reads its G query heads.
  qg = q.reshape(bsz, lp, hkv, group, d)
  dog = do.reshape(bsz, lp, hkv, group, d)
  lseg = lse.reshape(bsz, hkv, group, lp)
  dig = di.reshape(bsz, hkv, group, lp)
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, h, b: (b, j, h, 0))
  group_spec = pl.BlockSpec((None, lp, None, group, d), lambda j, h, b: (b, 0, h, 0, 0))
  group_rows = pl.BlockSpec((None, None, group, lp), lambda j, h, b: (b, h, 0, 0))
  dk, dv = _listed_call(
      functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk, group=group),
      bwd_lists,
      grid=(nk, hkv, bsz),
      in_specs=[
          group_spec, kv_spec, kv_spec,
          pl.BlockSpec((None, 4, lp), lambda j, h, b: (b, 0, 0)),
          pl.BlockSpec((None, 4, bk), lambda j, h, b: (b, 0, j)),
          group_spec, group_rows, group_rows,
      ],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret,
      name="mot_flash_dkv_gpu",
  )(qg, k, v, qm, km, dog, lseg, dig)
  return dq, dk, dv


_KERNELS = kc.Kernels(_fwd, _backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta,
                    k_meta: TokenMeta | None = None, *, scale: float | None = None,
                    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    interpret: bool = False) -> jax.Array:
  """Fused MoT attention on GPU (self-attention), differentiable in q, k, v: q ``[B, L, Hq, D]``,
  k/v ``[B, L, Hkv, D]``, metadata fields ``[B, L]``; returns ``[B, L, Hq, D]``."""
  k_meta, scale = kc.check_self_attention(q, k, q_meta, k_meta, scale)
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk < 16 or blk & (blk - 1):
      raise ValueError(f"{name}={blk} must be a power of two >= 16 (Triton tiles)")
  lq, d = q.shape[1], q.shape[3]
  lp = kc.round_up(lq, max(block_q, block_k))
  dp = max(16, 1 << (d - 1).bit_length())
  qm, km, fwd_lists, bwd_lists = kc.kernel_meta(q_meta, k_meta, lp, block_q, block_k)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, lp - lq), (0, 0), (0, dp - d)))
  options = (("scale", scale), ("bq", block_q), ("bk", block_k), ("interpret", interpret))
  o = kc.flash(pad(q), pad(k), pad(v), qm, km, fwd_lists, bwd_lists, _KERNELS, options)
  return o[:, :lq, :, :d]
