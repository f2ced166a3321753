"""Pallas TPU (Mosaic) flash attention for the MoT generalized causal mask, forward and backward.

Layout inside the kernels: q/o ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` (query head ``h`` reads
key/value head ``h // G``, ``G = Hq / Hkv``), metadata ``[B, 4, L]`` int32 rows, logsumexp and
the backward's ``delta = rowsum(dO * O)`` as ``[B, Hq, 1, L]`` fp32 rows. The mask is computed
per tile from the metadata; no ``L x L`` array ever exists. What both Pallas backends share (the
metadata encoding, the tile mask, the backward tile math, the ``custom_vjp``) is in
:mod:`kernel_common`.

Block skipping. :mod:`block_summary` classifies every (q-block, k-block) tile as EMPTY, PARTIAL
or FULL before the kernel runs and compresses the classes into per-row lists that are passed as
scalar-prefetch operands (SMEM). FULL tiles skip the mask evaluation. Two pipelines:

* ``"dma"`` (default): grid (B, Hkv * chunks, nq) for the forward and dQ kernels, where a
  program owns one query block of the query heads of a GQA group (or of a chunk of the group,
  sized by VMEM_BUDGET), so each K/V tile is copied and masked once for all of them; grid
  (B, Hkv, nk) for dK/dV. Each program runs a loop of exactly ``count`` iterations over its
  listed tiles, double buffering the tile operands (K/V/metadata, or Q/dO/lse/delta/metadata
  for dK/dV) with manual async copies from HBM. Skipped tiles cost nothing at all.
* ``"grid"``: grid (B, Hq, nq, nk) and (B, Hkv, nk, G, nq); the innermost axis walks the list
  through the BlockSpec index maps, so only listed blocks are DMA'd; list padding repeats the
  last entry, so the pipeline issues no copy for it and ``pl.when`` skips the compute, but each
  padding step still costs a grid step.

The dK/dV kernels walk the transposed lists (per key block, the visible query blocks, for each
query head of the group, summing dK/dV over the group) and compute transposed tiles (keys in
sublanes, queries in lanes).

Queries that see no key (padding) output zeros and get zero gradients, like the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimage_jax.attention import block_summary as bs
from unimage_jax.attention import kernel_common as kc
from unimage_jax.attention.kernel_common import MASK_VALUE, dot_nn, dot_nt
from unimage_jax.layout import TokenMeta

DEFAULT_BLOCK_Q = 256  # x G query heads per program in the "dma" pipeline
DEFAULT_BLOCK_K = 512
DEFAULT_PIPELINE = "dma"  # or "grid"; see flash_attention
LANES = 128  # softmax statistics are kept lane-broadcast: [bq, LANES]


def _listed_call(kernel, lists: bs.BlockLists, *, grid, in_specs, out_specs, scratch_shapes,
                 out_shape, arbitrary: int, interpret, name):
  """``pl.pallas_call`` whose first three operands are the tile lists (index, full, count;
  flattened, in SMEM); the last ``arbitrary`` grid axes accumulate into the outputs."""
  call = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch_shapes),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",) * (len(grid) - arbitrary) + ("arbitrary",) * arbitrary),
      interpret=interpret,
      name=name,
  )
  return lambda *operands: call(lists.index.reshape(-1), lists.full.reshape(-1),
                                lists.count.reshape(-1), *operands)


def _tile_mask(qm, km):
  """Mask of a ``[bq, bk]`` tile from the metadata blocks ``qm [4, bq]`` and ``km [4, bk]``."""
  return kc.tile_mask(kc.query_fields(qm), kc.key_fields(km))


def _tile_mask_t(qm, km):
  """Mask of a transposed ``[bk, bq]`` tile (keys in sublanes, queries in lanes: dK/dV)."""
  return kc.tile_mask(kc.query_fields(qm, axis=1), kc.key_fields(km, axis=0))


def _by_tile_class(is_full, step, active=None):
  """``step(masked=True)`` on a PARTIAL tile, ``step(masked=False)`` on a FULL one (while
  ``active``, when given)."""
  partial, full = is_full == 0, is_full != 0
  if active is not None:
    partial, full = active & partial, active & full
  pl.when(partial)(lambda: step(True))
  pl.when(full)(lambda: step(False))


def _softmax_init(m_ref, l_ref, acc_ref):
  """Empty online-softmax state: running max MASK_VALUE, sum and accumulator 0."""
  m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
  l_ref[...] = jnp.zeros_like(l_ref)
  acc_ref[...] = jnp.zeros_like(acc_ref)


def _softmax_update(s, mask, v, m_ref, l_ref, acc_ref, at):
  """One key tile of the online softmax: fp32 scores ``s [bq, bk]`` (``mask`` None on FULL
  tiles) update the running max and sum (``[bq, LANES]``) and the output accumulator at
  ``ref[at]``."""
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_prev = m_ref[at][:, :1]
  l_prev = l_ref[at][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  p = kc.masked_by(mask)(jnp.exp(s - m_next))
  alpha = jnp.exp(m_prev - m_next)
  m_ref[at] = jnp.broadcast_to(m_next, (s.shape[0], LANES))
  l_ref[at] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True),
                               (s.shape[0], LANES))
  acc_ref[at] = alpha * acc_ref[at] + dot_nn(p.astype(v.dtype), v)


def _softmax_finish(m_ref, l_ref, acc_ref, o_ref, lse_ref, at):
  """Writes the normalised output and the logsumexp row ``[1, bq]`` at ``[at]``; queries that
  saw no key get zeros."""
  l = l_ref[at][:, :1]
  seen = l > 0.0
  o_ref[at] = (acc_ref[at] * jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
               ).astype(o_ref.dtype)
  lse = jnp.where(seen, m_ref[at][:, :1] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  lse_ref[at] = jnp.broadcast_to(lse, (l.shape[0], LANES)).T[:1, :]


def _accumulate_dkv(q, k, v, do, lse, di, mask, scale, dk_ref, dv_ref):
  """Adds one transposed tile's dK/dV (:func:`kernel_common.dkv_tile`) to the accumulators."""
  dk, dv = kc.dkv_tile(q, k, v, do, lse, di, kc.masked_by(mask), scale)
  dv_ref[...] += dv
  dk_ref[...] += dk


def _zero(*refs):
  for ref in refs:
    ref[...] = jnp.zeros_like(ref)


def _store(out_ref, acc_ref):
  """An fp32 accumulator into its output block, in the output's dtype."""
  out_ref[...] = acc_ref[...].astype(out_ref.dtype)


# --------------------------------------------------------------------------------------------
# "grid" pipeline: the innermost grid axis walks a block's tile list through the index maps
# --------------------------------------------------------------------------------------------


def _grid_step(full_ref, cnt_ref, row, width, t, *, first, last, init, step, finish):
  """The body of a "grid" kernel at list position ``t`` of list ``row`` (``width`` entries):
  ``init`` on the first step of an output block, the tile's ``step`` if ``t`` is a listed
  tile, ``finish`` on the last step."""
  pl.when(first)(init)
  _by_tile_class(full_ref[row * width + t], step, active=t < cnt_ref[row])
  pl.when(last)(finish)


def _fwd_kernel(kv_idx_ref, kv_full_ref, kv_cnt_ref,  # scalar prefetch (SMEM)
                q_ref, qm_ref, k_ref, v_ref, km_ref,  # inputs (VMEM blocks)
                o_ref, lse_ref,  # outputs
                m_scr, l_scr, acc_scr,  # scratch
                *, scale, nq, nk):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  def step(masked: bool):
    mask = _tile_mask(qm_ref, km_ref) if masked else None
    _softmax_update(dot_nt(q_ref[...], k_ref[...]) * scale, mask, v_ref[...], m_scr, l_scr,
                    acc_scr, ...)

  _grid_step(kv_full_ref, kv_cnt_ref, b * nq + i, nk, t, first=t == 0, last=t == nk - 1,
             init=lambda: _softmax_init(m_scr, l_scr, acc_scr), step=step,
             finish=lambda: _softmax_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref, ...))


def _dq_kernel(kv_idx_ref, kv_full_ref, kv_cnt_ref,
               q_ref, qm_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, km_ref,
               dq_ref,
               acc_scr,
               *, scale, nq, nk):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  def step(masked: bool):
    mask = _tile_mask(qm_ref, km_ref) if masked else None
    acc_scr[...] += kc.dq_tile(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                               lse_ref[0][:, None], di_ref[0][:, None], kc.masked_by(mask), scale)

  _grid_step(kv_full_ref, kv_cnt_ref, b * nq + i, nk, t, first=t == 0, last=t == nk - 1,
             init=lambda: _zero(acc_scr), step=step, finish=lambda: _store(dq_ref, acc_scr))


def _dkv_kernel(q_idx_ref, q_full_ref, q_cnt_ref,
                q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref,
                dk_scr, dv_scr,
                *, scale, nq, nk, group):
  b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  def step(masked: bool):
    mask = _tile_mask_t(qm_ref, km_ref) if masked else None
    # lse/delta rows [1, bq]
    _accumulate_dkv(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], di_ref[...],
                    mask, scale, dk_scr, dv_scr)

  def finish():
    _store(dk_ref, dk_scr)
    _store(dv_ref, dv_scr)

  _grid_step(q_full_ref, q_cnt_ref, b * nk + j, nq, t, first=(g == 0) & (t == 0),
             last=(g == group - 1) & (t == nq - 1), init=lambda: _zero(dk_scr, dv_scr), step=step,
             finish=finish)


class _GridSpecs(NamedTuple):
  """BlockSpecs of the "grid" forward / dQ calls (grid (B, Hq, nq, nk): a program per query
  head, query block and list position)."""

  q: pl.BlockSpec  # [bq, D] query-side block (q, o, dO, dQ)
  row: pl.BlockSpec  # [1, bq] row (logsumexp, delta)
  qm: pl.BlockSpec  # [4, bq] query metadata
  kv: pl.BlockSpec  # [bk, D] K/V tile listed at step t
  km: pl.BlockSpec  # [4, bk] its metadata


def _grid_specs(bq: int, bk: int, d: int, group: int, nq: int, nk: int) -> _GridSpecs:
  def listed(b, i, t, idx):
    return idx[(b * nq + i) * nk + t]

  return _GridSpecs(
      q=pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0)),
      row=pl.BlockSpec((None, None, 1, bq), lambda b, h, i, t, *_: (b, h, 0, i)),
      qm=pl.BlockSpec((None, 4, bq), lambda b, h, i, t, *_: (b, 0, i)),
      kv=pl.BlockSpec((None, None, bk, d),
                      lambda b, h, i, t, idx, *_: (b, h // group, listed(b, i, t, idx), 0)),
      km=pl.BlockSpec((None, 4, bk), lambda b, h, i, t, idx, *_: (b, 0, listed(b, i, t, idx))),
  )


def _dkv(q, k, v, qm, km, do, lse, di, lists_t: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk

  def qi(b, j, t, idx):
    return idx[(b * nk + j) * nq + t]

  q_map = lambda b, h, j, g, t, idx, *_: (b, h * group + g, qi(b, j, t, idx), 0)
  row_map = lambda b, h, j, g, t, idx, *_: (b, h * group + g, 0, qi(b, j, t, idx))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, g, t, *_: (b, h, j, 0))
  return _listed_call(
      functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, group=group), lists_t,
      grid=(bsz, hkv, nk, group, nq),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), q_map),
          kv_spec,
          kv_spec,
          pl.BlockSpec((None, 4, bq), lambda b, h, j, g, t, idx, *_: (b, 0, qi(b, j, t, idx))),
          pl.BlockSpec((None, 4, bk), lambda b, h, j, g, t, *_: (b, 0, j)),
          pl.BlockSpec((None, None, bq, d), q_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
      ],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      arbitrary=2, interpret=interpret, name="mot_flash_dkv",
  )(q, k, v, qm, km, do, lse, di)


# --------------------------------------------------------------------------------------------
# "dma" pipeline: one program per query block (forward, dQ) or key block (dK/dV) that loops
# over *only* its listed tiles, double-buffering the tiles' operands with manual async copies
# from HBM. Skipped tiles cost nothing, not even a grid step.
# --------------------------------------------------------------------------------------------


def _tile_copies(srcs, bufs, sem, slot):
  """Async copies of one tile's operands into slot ``slot`` of the double buffers."""
  return [pltpu.make_async_copy(src, buf.at[slot], sem.at[n, slot])
          for n, (src, buf) in enumerate(zip(srcs, bufs))]


def _double_buffered_loop(n, srcs_at, bufs, sem, body):
  """``for t in range(n)``: waits for tile t's copies, starts tile t+1's, runs ``body(t, slot)``.

  ``srcs_at(t)`` gives the HBM source refs of tile t (same shapes for every t)."""

  @pl.when(n > 0)
  def _first():
    for c in _tile_copies(srcs_at(0), bufs, sem, 0):
      c.start()

  def step(t, carry):
    slot = lax.rem(t, 2)
    for c in _tile_copies(srcs_at(t), bufs, sem, slot):
      c.wait()

    @pl.when(t + 1 < n)
    def _next():
      for c in _tile_copies(srcs_at(t + 1), bufs, sem, 1 - slot):
        c.start()

    body(t, slot)
    return carry

  lax.fori_loop(0, n, step, 0)


VMEM_BUDGET = 12 * 2**20  # per-program VMEM the "dma" forward/dQ kernels plan for


def _group_chunk(group: int, bq: int, bk: int, d: int, itemsize: int) -> int:
  """How many query heads of a GQA group one "dma" forward/dQ program processes: the largest
  divisor of ``group`` whose estimated VMEM (double-buffered q/o or q/dO/dq blocks, fp32
  accumulators and softmax statistics, K/V buffers, score temporaries) fits VMEM_BUDGET."""
  fixed = 4 * bk * d * itemsize + 3 * bq * bk * 4
  per_head_fwd = bq * (4 * d * itemsize + 2 * LANES * 4 + d * 4)
  per_head_dq = bq * (6 * d * itemsize + d * 4 + 4 * 8 * 4)
  best = 1
  for gc in range(1, group + 1):
    if group % gc == 0 and fixed + gc * max(per_head_fwd, per_head_dq) <= VMEM_BUDGET:
      best = gc
  return best


class _DmaLoop(NamedTuple):
  """Static sizes of a "dma" forward / dQ program's loop."""

  nq: int  # query blocks
  nk: int  # key blocks (the width of a tile list)
  bk: int  # key block size
  group: int  # query heads per program (a chunk of a GQA group)
  chunks: int  # programs per GQA group


def _for_listed_kv_tiles(lists, qm_ref, hbm, bufs, sem, head, loop: _DmaLoop):
  """The loop of a "dma" forward / dQ program (one query block of ``loop.group`` query heads
  that share one KV head): copies each listed K/V tile (K, V, metadata: ``hbm`` refs into
  ``bufs``) once, double buffered, evaluates its mask once (None on FULL tiles) and runs
  ``head(g, k, v, mask)`` for each of the heads."""
  idx_ref, full_ref, cnt_ref = lists
  k_hbm, v_hbm, km_hbm = hbm
  kbuf, vbuf, kmbuf = bufs
  nk, bk = loop.nk, loop.bk
  b, hc, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hk = hc // loop.chunks
  row = b * loop.nq + i

  def srcs_at(t):
    start = pl.multiple_of(idx_ref[row * nk + t] * bk, bk)
    return (k_hbm.at[b, hk, pl.ds(start, bk)], v_hbm.at[b, hk, pl.ds(start, bk)],
            km_hbm.at[b, :, pl.ds(start, bk)])

  def body(t, slot):
    def step(masked):
      k, v = kbuf[slot], vbuf[slot]
      mask = _tile_mask(qm_ref, kmbuf.at[slot]) if masked else None

      def each_head(g, carry):
        head(g, k, v, mask)
        return carry

      lax.fori_loop(0, loop.group, each_head, 0)

    _by_tile_class(full_ref[row * nk + t], step)

  _double_buffered_loop(cnt_ref[row], srcs_at, bufs, sem, body)


def _fwd_kernel_dma(kv_idx_ref, kv_full_ref, kv_cnt_ref,
                    q_ref, qm_ref, k_hbm, v_hbm, km_hbm,
                    o_ref, lse_ref,
                    kbuf, vbuf, kmbuf, sem, m_scr, l_scr, acc_scr,
                    *, scale, loop: _DmaLoop):
  """One program = one query block of the query heads of a GQA group chunk: each K/V tile is
  copied once and its mask evaluated once for those heads."""
  _softmax_init(m_scr, l_scr, acc_scr)

  def head(g, k, v, mask):
    _softmax_update(dot_nt(q_ref[g], k) * scale, mask, v, m_scr, l_scr, acc_scr, g)

  _for_listed_kv_tiles((kv_idx_ref, kv_full_ref, kv_cnt_ref), qm_ref, (k_hbm, v_hbm, km_hbm),
                       (kbuf, vbuf, kmbuf), sem, head, loop)

  def finish(g, carry):
    _softmax_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref, g)
    return carry

  lax.fori_loop(0, loop.group, finish, 0)


def _dq_kernel_dma(kv_idx_ref, kv_full_ref, kv_cnt_ref,
                   q_ref, qm_ref, do_ref, lse_ref, di_ref, k_hbm, v_hbm, km_hbm,
                   dq_ref,
                   kbuf, vbuf, kmbuf, sem, acc_scr,
                   *, scale, loop: _DmaLoop):
  """Like the forward: one program per (query block, chunk of a GQA group)."""
  _zero(acc_scr)

  def head(g, k, v, mask):
    acc_scr[g] = acc_scr[g] + kc.dq_tile(q_ref[g], k, v, do_ref[g], lse_ref[g][0][:, None],
                                         di_ref[g][0][:, None], kc.masked_by(mask), scale)

  _for_listed_kv_tiles((kv_idx_ref, kv_full_ref, kv_cnt_ref), qm_ref, (k_hbm, v_hbm, km_hbm),
                       (kbuf, vbuf, kmbuf), sem, head, loop)
  _store(dq_ref, acc_scr)


def _dkv_kernel_dma(q_idx_ref, q_full_ref, q_cnt_ref,
                    k_ref, v_ref, km_ref, q_hbm, do_hbm, lse_hbm, di_hbm, qm_hbm,
                    dk_ref, dv_ref,
                    qbuf, dobuf, lsebuf, dibuf, qmbuf, sem, dk_scr, dv_scr,
                    *, scale, nq, nk, bq, group):
  b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = b * nk + j
  cnt = q_cnt_ref[row]
  _zero(dk_scr, dv_scr)
  safe_cnt = jnp.maximum(cnt, 1)

  def srcs_at(u):  # u enumerates (query head g of the group, t-th listed query block)
    g, t = u // safe_cnt, lax.rem(u, safe_cnt)
    h = hk * group + g
    start = pl.multiple_of(q_idx_ref[row * nq + t] * bq, bq)
    return (q_hbm.at[b, h, pl.ds(start, bq)], do_hbm.at[b, h, pl.ds(start, bq)],
            lse_hbm.at[b, h, :, pl.ds(start, bq)], di_hbm.at[b, h, :, pl.ds(start, bq)],
            qm_hbm.at[b, :, pl.ds(start, bq)])

  def body(u, slot):
    def step(masked):
      mask = _tile_mask_t(qmbuf.at[slot], km_ref) if masked else None
      _accumulate_dkv(qbuf[slot], k_ref[...], v_ref[...], dobuf[slot], lsebuf[slot],
                      dibuf[slot], mask, scale, dk_scr, dv_scr)

    _by_tile_class(q_full_ref[row * nq + lax.rem(u, safe_cnt)], step)

  _double_buffered_loop(cnt * group, srcs_at, (qbuf, dobuf, lsebuf, dibuf, qmbuf), sem, body)
  _store(dk_ref, dk_scr)
  _store(dv_ref, dv_scr)


def _dkv_dma(q, k, v, qm, km, do, lse, di, lists_t: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, *_: (b, h, j, 0))
  return _listed_call(
      functools.partial(_dkv_kernel_dma, scale=scale, nq=nq, nk=nk, bq=bq, group=group), lists_t,
      grid=(bsz, hkv, nk),
      in_specs=[kv_spec, kv_spec, pl.BlockSpec((None, 4, bk), lambda b, h, j, *_: (b, 0, j)),
                hbm, hbm, hbm, hbm, hbm],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[
          pltpu.VMEM((2, bq, d), q.dtype),
          pltpu.VMEM((2, bq, d), do.dtype),
          pltpu.VMEM((2, 1, bq), jnp.float32),
          pltpu.VMEM((2, 1, bq), jnp.float32),
          pltpu.VMEM((2, 4, bq), jnp.int32),
          pltpu.SemaphoreType.DMA((5, 2)),
          pltpu.VMEM((bk, d), jnp.float32),
          pltpu.VMEM((bk, d), jnp.float32),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      arbitrary=0, interpret=interpret, name="mot_flash_dkv_dma",
  )(k, v, km, q, do, lse, di, qm)


# --------------------------------------------------------------------------------------------
# The calls of both pipelines, as kernel_common.Kernels, and the entry point
# --------------------------------------------------------------------------------------------


def _query_major(pipeline, kernel, lists: bs.BlockLists, q, k, v, qm, km, per_head, *, scale, bq,
                 bk, interpret, outputs, scratch, name):
  """A forward / dQ call: one program per query block, whose kernel takes the query-side blocks
  (q, its metadata, then ``per_head``: ("block", ``[B, Hq, L, D]``) or ("row", ``[B, Hq, 1, L]``)
  pairs) and then K, V and key metadata: the tile listed at the innermost grid step ("grid":
  grid (B, Hq, nq, nk)) or HBM refs the kernel copies its tiles from ("dma": grid
  (B, Hkv * chunks, nq); a program takes the heads of a GQA group chunk, a leading ``gc`` axis of
  its blocks). ``outputs``: (kind, dtype) pairs; ``scratch``: (shape, dtype) of the kernel's
  per-head scratch. Returns the outputs in the kernel layout."""
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  nq, nk = lp // bq, lp // bk
  if pipeline == "grid":
    sp = _grid_specs(bq, bk, d, hq // hkv, nq, nk)
    heads, lead, grid, arbitrary = hq, (), (bsz, hq, nq, nk), 1
    specs = {"block": sp.q, "row": sp.row, "qm": sp.qm}
    kv_specs, kv_scratch = [sp.kv, sp.kv, sp.km], []
    kernel = functools.partial(kernel, scale=scale, nq=nq, nk=nk)
  else:
    gc = _group_chunk(hq // hkv, bq, bk, d, q.dtype.itemsize)
    chunks = hq // hkv // gc
    # free reshape: query heads hk*G + c*gc + [0, gc) share KV head hk
    heads, lead, grid, arbitrary = hkv * chunks, (gc,), (bsz, hkv * chunks, nq), 0
    specs = {"block": pl.BlockSpec((None, None, gc, bq, d), lambda b, h, i, *_: (b, h, 0, i, 0)),
             "row": pl.BlockSpec((None, None, gc, 1, bq), lambda b, h, i, *_: (b, h, 0, 0, i)),
             "qm": pl.BlockSpec((None, 4, bq), lambda b, h, i, *_: (b, 0, i))}
    kv_specs = [pl.BlockSpec(memory_space=pl.ANY)] * 3
    kv_scratch = [pltpu.VMEM((2, bk, d), k.dtype), pltpu.VMEM((2, bk, d), v.dtype),
                  pltpu.VMEM((2, 4, bk), jnp.int32), pltpu.SemaphoreType.DMA((3, 2))]
    kernel = functools.partial(kernel, scale=scale, loop=_DmaLoop(nq, nk, bk, gc, chunks))
  grouped = lambda x: x.reshape(bsz, heads, *lead, *x.shape[2:])
  shapes = {"block": (lp, d), "row": (1, lp)}
  outs = _listed_call(
      kernel, lists, grid=grid,
      in_specs=[specs["block"], specs["qm"], *(specs[kind] for kind, _ in per_head), *kv_specs],
      out_specs=[specs[kind] for kind, _ in outputs],
      scratch_shapes=[*kv_scratch, *(pltpu.VMEM((*lead, *shape), dt) for shape, dt in scratch)],
      out_shape=[jax.ShapeDtypeStruct((bsz, heads, *lead, *shapes[kind]), dt)
                 for kind, dt in outputs],
      arbitrary=arbitrary, interpret=interpret, name=name,
  )(grouped(q), qm, *(grouped(x) for _, x in per_head), k, v, km)
  return [x.reshape(bsz, hq, *x.shape[-2:]) for x in outs]


_SUFFIX = {"grid": "", "dma": "_dma"}  # of the kernels' names


def _fwd(pipeline, q, k, v, qm, km, lists: bs.BlockLists, *, bq, **options):
  kernel = {"grid": _fwd_kernel, "dma": _fwd_kernel_dma}[pipeline]
  stats = ((bq, LANES), jnp.float32)  # running max / sum
  return _query_major(pipeline, kernel, lists, q, k, v, qm, km, (), bq=bq, **options,
                      outputs=(("block", q.dtype), ("row", jnp.float32)),
                      scratch=(stats, stats, ((bq, q.shape[-1]), jnp.float32)),
                      name="mot_flash_fwd" + _SUFFIX[pipeline])


def _backward(pipeline, q, k, v, qm, km, o, lse, do, fwd_lists, bwd_lists, *, bq, **options):
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]
  (dq,) = _query_major(pipeline, {"grid": _dq_kernel, "dma": _dq_kernel_dma}[pipeline], fwd_lists,
                       q, k, v, qm, km, (("block", do), ("row", lse), ("row", di)), bq=bq, **options,
                       outputs=(("block", q.dtype),), scratch=(((bq, q.shape[-1]), jnp.float32),),
                       name="mot_flash_dq" + _SUFFIX[pipeline])
  dkv = {"grid": _dkv, "dma": _dkv_dma}[pipeline]
  dk, dv = dkv(q, k, v, qm, km, do, lse, di, bwd_lists, bq=bq, **options)
  return dq, dk, dv


_KERNELS = {p: kc.Kernels(functools.partial(_fwd, p), functools.partial(_backward, p))
            for p in ("dma", "grid")}
PIPELINES = tuple(_KERNELS)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta,
                    k_meta: TokenMeta | None = None, *, scale: float | None = None,
                    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    interpret: bool = False, pipeline: str | None = None) -> jax.Array:
  """Fused MoT attention (self-attention: ``Lq == Lk``), differentiable in q, k, v.

  q ``[B, L, Hq, D]``, k/v ``[B, L, Hkv, D]``, metadata fields ``[B, L]``; returns
  ``[B, L, Hq, D]``. ``pipeline=None`` uses ``DEFAULT_PIPELINE``. ``"dma"`` (default): each
  program loops over only its listed tiles with manual double-buffered copies, so skipped tiles
  cost nothing. ``"grid"``: the listed tiles are walked by the innermost grid axis through
  BlockSpec index maps (padding steps issue no copy and no compute but still cost a grid step).
  ``interpret=True`` runs on the CPU (for "dma" through the TPU interpreter, which simulates DMAs
  and semaphores).

  Lengths that are not a multiple of the block sizes are padded with padding tokens and sliced
  back; block sizes are clipped to the padded length so short inputs use one tile.
  """
  k_meta, scale = kc.check_self_attention(q, k, q_meta, k_meta, scale)
  pipeline = DEFAULT_PIPELINE if pipeline is None else pipeline
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
  lq = q.shape[1]
  step = int(np.lcm(block_q, block_k))
  if lq <= step:  # a single tile: shrink it to the (lane-aligned) length
    block_q = block_k = step = kc.round_up(lq, LANES)
  lp = kc.round_up(lq, step)
  qm, km, fwd_lists, bwd_lists = kc.kernel_meta(q_meta, k_meta, lp, block_q, block_k)

  def to_kernel(x):  # [B, L, H, D] -> [B, H, Lp, D]
    x = jnp.pad(x, ((0, 0), (0, lp - lq), (0, 0), (0, 0))) if lp > lq else x
    return jnp.swapaxes(x, 1, 2)

  if interpret is True and pipeline == "dma":
    interpret = pltpu.InterpretParams()
  options = (("scale", scale), ("bq", block_q), ("bk", block_k), ("interpret", interpret))
  o = kc.flash(to_kernel(q), to_kernel(k), to_kernel(v), qm, km, fwd_lists, bwd_lists,
               _KERNELS[pipeline], options)
  return jnp.swapaxes(o, 1, 2)[:, :lq]
