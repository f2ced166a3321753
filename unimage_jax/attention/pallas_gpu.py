"""Pallas Triton (GPU, e.g. H100) flash attention for the MoT generalized causal mask.

Same function, metadata encoding and block lists as :mod:`pallas_tpu`, organised the Triton way:
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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from unimage_jax.attention import block_summary as bs
from unimage_jax.attention.pallas_tpu import (MASK_VALUE, _KCODE, _ORDER, _SAMPLE, _SEGMENT,
                                              _dot_nn, _dot_nt, _mask, _round_up, pack_meta,
                                              pad_meta, plan)
from unimage_jax.layout import TokenMeta

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2


def _q_meta_cols(qm_ref):
  return (qm_ref[_SAMPLE][:, None], qm_ref[_SEGMENT][:, None], qm_ref[_ORDER][:, None])


def _k_meta_rows(km_ref, sl):
  return (km_ref[_SAMPLE, sl][None, :], km_ref[_SEGMENT, sl][None, :],
          km_ref[_ORDER, sl][None, :], km_ref[_KCODE, sl][None, :])


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, idx_ref, full_ref, cnt_ref,
                o_ref, lse_ref, *, scale, nq, nk, bq, bk):
  i, b = pl.program_id(0), pl.program_id(2)
  row = b * nq + i
  cnt = cnt_ref[row]
  q = q_ref[...]
  qcols = _q_meta_cols(qm_ref)
  d = q.shape[-1]

  def body(t, carry):
    acc, m_prev, l_prev = carry
    j = idx_ref[row * nk + t]
    sl = pl.ds(j * bk, bk)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    s = _dot_nt(q, k) * scale

    def masked(s):
      mask = _mask(*qcols, *_k_meta_rows(km_ref, sl))
      return jnp.where(mask, s, MASK_VALUE), mask.astype(jnp.float32)

    def unmasked(s):
      return s, jnp.ones_like(s)

    s, keep = lax.cond(full_ref[row * nk + t] != 0, unmasked, masked, s)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None]) * keep
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt, body, init)
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc * jnp.where(seen, 1.0 / safe_l, 0.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _fwd(q, k, v, qm, km, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, lp, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  kernel = functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk)
  flat = lambda x: x.reshape(-1)
  return pl.pallas_call(
      kernel,
      grid=(nq, hq, bsz),
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, h, b: (b, 0, h // group, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, h, b: (b, 0, h // group, 0)),
          pl.BlockSpec((None, 4, bq), lambda i, h, b: (b, 0, i)),
          pl.BlockSpec((None, 4, lp), lambda i, h, b: (b, 0, 0)),
          pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, hq, lp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="mot_flash_fwd_gpu",
  )(q, k, v, qm, km, flat(lists.index), flat(lists.full), flat(lists.count))


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
  qcols = _q_meta_cols(qm_ref)

  def body(t, acc):
    j = idx_ref[row * nk + t]
    sl = pl.ds(j * bk, bk)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    p = jnp.exp(_dot_nt(q, k) * scale - lse)
    p = lax.cond(full_ref[row * nk + t] != 0, lambda p: p,
                 lambda p: jnp.where(_mask(*qcols, *_k_meta_rows(km_ref, sl)), p, 0.0), p)
    ds = p * (_dot_nt(do, v) - di) * scale
    return acc + _dot_nn(ds.astype(k.dtype), k)

  acc = lax.fori_loop(0, cnt, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
                idx_ref, full_ref, cnt_ref, dk_ref, dv_ref, *, scale, nq, nk, bq, bk, group):
  j, b = pl.program_id(0), pl.program_id(2)
  row = b * nk + j
  cnt = cnt_ref[row]
  k = k_ref[...]
  v = v_ref[...]
  kcols = (km_ref[_SAMPLE][:, None], km_ref[_SEGMENT][:, None], km_ref[_ORDER][:, None],
           km_ref[_KCODE][:, None])

  def head(g, carry):
    def body(t, carry):
      dk, dv = carry
      i = idx_ref[row * nq + t]
      sl = pl.ds(i * bq, bq)
      q = q_ref[sl, g, :]
      do = do_ref[sl, g, :]
      lse = lse_ref[g, sl][None, :]
      di = di_ref[g, sl][None, :]
      pt = jnp.exp(_dot_nt(k, q) * scale - lse)  # [bk, bq]

      def masked(pt):
        qrows = (qm_ref[_SAMPLE, sl][None, :], qm_ref[_SEGMENT, sl][None, :],
                 qm_ref[_ORDER, sl][None, :])
        return jnp.where(_mask(*qrows, *kcols), pt, 0.0)

      pt = lax.cond(full_ref[row * nq + t] != 0, lambda p: p, masked, pt)
      dv = dv + _dot_nn(pt.astype(do.dtype), do)
      dst = pt * (_dot_nt(v, do) - di) * scale
      dk = dk + _dot_nn(dst.astype(q.dtype), q)
      return dk, dv

    return lax.fori_loop(0, cnt, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_calls(q, k, v, qm, km, do, lse, di, fwd_lists, bwd_lists, *, scale, bq, bk, interpret):
  bsz, lp, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  flat = lambda x: x.reshape(-1)
  params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk, bk=bk),
      grid=(nq, hq, bsz),
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, h, b: (b, 0, h // group, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, h, b: (b, 0, h // group, 0)),
          pl.BlockSpec((None, 4, bq), lambda i, h, b: (b, 0, i)),
          pl.BlockSpec((None, 4, lp), lambda i, h, b: (b, 0, 0)),
          pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, i)),
          pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, i)),
          pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
      ],
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="mot_flash_dq_gpu",
  )(q, k, v, qm, km, do, lse, di, flat(fwd_lists.index), flat(fwd_lists.full),
    flat(fwd_lists.count))
  # dK/dV: a program owns one key block of one key/value head and reads its G query heads.
  qg = q.reshape(bsz, lp, hkv, group, d)
  dog = do.reshape(bsz, lp, hkv, group, d)
  lseg = lse.reshape(bsz, hkv, group, lp)
  dig = di.reshape(bsz, hkv, group, lp)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk, group=group),
      grid=(nk, hkv, bsz),
      in_specs=[
          pl.BlockSpec((None, lp, None, group, d), lambda j, h, b: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, bk, None, d), lambda j, h, b: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, d), lambda j, h, b: (b, j, h, 0)),
          pl.BlockSpec((None, 4, lp), lambda j, h, b: (b, 0, 0)),
          pl.BlockSpec((None, 4, bk), lambda j, h, b: (b, 0, j)),
          pl.BlockSpec((None, lp, None, group, d), lambda j, h, b: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, None, group, lp), lambda j, h, b: (b, h, 0, 0)),
          pl.BlockSpec((None, None, group, lp), lambda j, h, b: (b, h, 0, 0)),
          pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
      ],
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, h, b: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, d), lambda j, h, b: (b, j, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="mot_flash_dkv_gpu",
  )(qg, k, v, qm, km, dog, lseg, dig, flat(bwd_lists.index), flat(bwd_lists.full), flat(bwd_lists.count))
  return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom_vjp
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qm, km, fwd_lists, bwd_lists, scale, bq, bk, interpret):
  o, _ = _fwd(q, k, v, qm, km, fwd_lists, scale=scale, bq=bq, bk=bk, interpret=interpret)
  return o


def _flash_fwd(q, k, v, qm, km, fwd_lists, bwd_lists, scale, bq, bk, interpret):
  o, lse = _fwd(q, k, v, qm, km, fwd_lists, scale=scale, bq=bq, bk=bk, interpret=interpret)
  return o, (q, k, v, qm, km, fwd_lists, bwd_lists, o, lse)


def _flash_bwd(scale, bq, bk, interpret, res, do):
  q, k, v, qm, km, fwd_lists, bwd_lists, o, lse = res
  di = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
  dq, dk, dv = _bwd_calls(q, k, v, qm, km, do, lse, di, fwd_lists, bwd_lists, scale=scale,
                          bq=bq, bk=bk, interpret=interpret)
  zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), tree)
  return dq, dk, dv, zeros(qm), zeros(km), zeros(fwd_lists), zeros(bwd_lists)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,  # [B, L, Hq, D]
    k: jax.Array,  # [B, L, Hkv, D]
    v: jax.Array,  # [B, L, Hkv, D]
    q_meta: TokenMeta,
    k_meta: TokenMeta | None = None,
    *,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: bool = False,
) -> jax.Array:  # [B, L, Hq, D]
  """Fused MoT attention on GPU (self-attention), differentiable in q, k, v."""
  k_meta = q_meta if k_meta is None else k_meta
  bsz, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if lq != lk:
    raise ValueError(f"self-attention kernel needs Lq == Lk, got {lq} and {lk}")
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk < 16 or blk & (blk - 1):
      raise ValueError(f"{name}={blk} must be a power of two >= 16 (Triton tiles)")
  scale = float(d**-0.5 if scale is None else scale)
  step = max(block_q, block_k)
  lp = _round_up(lq, step)
  dp = max(16, 1 << (d - 1).bit_length())
  qm_ = pad_meta(q_meta, lp)
  km_ = pad_meta(k_meta, lp)
  _, fwd_lists, bwd_lists = plan(qm_, km_, block_q, block_k)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, lp - lq), (0, 0), (0, dp - d)))
  o = _flash(pad(q), pad(k), pad(v), pack_meta(qm_, side="q"), pack_meta(km_, side="k"),
             fwd_lists, bwd_lists, scale, block_q, block_k, interpret)
  return o[:, :lq, :, :d]
