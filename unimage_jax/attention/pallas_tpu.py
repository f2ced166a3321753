"""Pallas TPU (Mosaic) flash attention for the MoT generalized causal mask, forward and backward.

Layout inside the kernels: q/o ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` (query head ``h`` reads
key/value head ``h // G``, ``G = Hq / Hkv``), metadata ``[B, 4, L]`` int32 rows, logsumexp and
the backward's ``delta = rowsum(dO * O)`` as ``[B, Hq, 1, L]`` fp32 rows. The mask is computed
per tile from the metadata; no ``L x L`` array ever exists.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimage_jax import layout
from unimage_jax.attention import block_summary as bs
from unimage_jax.layout import TokenMeta

MASK_VALUE = -1e30  # finite, so that fully masked rows never produce inf - inf
_PAD_Q_SAMPLE = np.iinfo(np.int32).min
_PAD_K_SAMPLE = np.iinfo(np.int32).min + 1

# Row indices of the packed metadata operand.
_SAMPLE, _SEGMENT, _ORDER, _KCODE = 0, 1, 2, 3
# k-side kind codes
_CODE_CAUSAL, _CODE_FULL, _CODE_NOISE = 0, 1, 2

DEFAULT_BLOCK_Q = 256  # x G query heads per program in the "dma" pipeline
DEFAULT_BLOCK_K = 512
DEFAULT_PIPELINE = "dma"  # or "grid"; see flash_attention


def _round_up(x: int, m: int) -> int:
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
  code = jnp.where(kind == layout.KIND_NOISE, _CODE_NOISE,
                   jnp.where((kind == layout.KIND_VIT) | (kind == layout.KIND_CLEAN),
                             _CODE_FULL, _CODE_CAUSAL))
  return jnp.stack([s, g, o, code.astype(jnp.int32)], axis=1)


def _precision(dtype):
  """fp32 operands get exact fp32 matmuls (Mosaic fp32 contraction / Triton IEEE); bf16 the
  native MXU / tensor-core path."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nt(a, b):
  """a @ b.T with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(a.dtype))


def _dot_nn(a, b):
  """a @ b with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(a.dtype))


def _mask(qs, qg, qo, ks, kg, ko, kc):
  """The visibility rule on broadcastable int32 operands (padding handled by the sentinels).

  Every operand is broadcast to the tile shape before comparing, and only elementwise logic on
  the resulting booleans follows (Mosaic lowers this well; no boolean broadcasts or selects).
  """
  shape = jnp.broadcast_shapes(qs.shape, ks.shape)
  qs, qg, qo, ks, kg, ko, kc = (jnp.broadcast_to(x, shape) for x in (qs, qg, qo, ks, kg, ko, kc))
  same_segment = qg == kg
  causal = (ko <= qo) & (same_segment | (kc != _CODE_NOISE))
  by_segment = same_segment & (kc != _CODE_CAUSAL)
  return (qs == ks) & (causal | by_segment)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(kv_idx_ref, kv_full_ref, kv_cnt_ref,  # scalar prefetch (SMEM)
                q_ref, k_ref, v_ref, qm_ref, km_ref,  # inputs (VMEM blocks)
                o_ref, lse_ref,  # outputs
                m_scr, l_scr, acc_scr,  # scratch
                *, scale, nq, nk, bq, bk):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i
  cnt = kv_cnt_ref[row]
  is_full = kv_full_ref[row * nk + t]

  @pl.when(t == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def step(masked: bool):
    q = q_ref[...]
    k = k_ref[...]
    s = _dot_nt(q, k)
    s = s * scale
    if masked:
      mask = _mask(qm_ref[_SAMPLE][:, None], qm_ref[_SEGMENT][:, None], qm_ref[_ORDER][:, None],
                   km_ref[_SAMPLE][None, :], km_ref[_SEGMENT][None, :], km_ref[_ORDER][None, :],
                   km_ref[_KCODE][None, :])
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_scr[...][:, :1]
    l_prev = l_scr[...][:, :1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_next)
    if masked:
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_next, l_scr.shape)
    v = v_ref[...]
    pv = _dot_nn(p.astype(v.dtype), v)
    acc_scr[...] = alpha * acc_scr[...] + pv

  @pl.when((t < cnt) & (is_full == 0))
  def _partial():
    step(masked=True)

  @pl.when((t < cnt) & (is_full != 0))
  def _full():
    step(masked=False)

  @pl.when(t == nk - 1)
  def _finish():
    l = l_scr[...][:, :1]
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * inv).astype(o_ref.dtype)
    lse = jnp.where(seen, m_scr[...][:, :1] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    lse_ref[...] = jnp.broadcast_to(lse, (bq, 128)).T[:1, :]


def _fwd(q, k, v, qm, km, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  kv_idx = lists.index.reshape(-1)
  kv_full = lists.full.reshape(-1)
  kv_cnt = lists.count.reshape(-1)

  def kv_map(b, h, i, t, idx, full, cnt):
    return b, h // group, idx[(b * nq + i) * nk + t], 0

  def km_map(b, h, i, t, idx, full, cnt):
    return b, 0, idx[(b * nq + i) * nk + t]

  kernel = functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hq, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, 4, bq), lambda b, h, i, t, *_: (b, 0, i)),
              pl.BlockSpec((None, 4, bk), km_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, 1, bq), lambda b, h, i, t, *_: (b, h, 0, i)),
          ],
          scratch_shapes=[
              pltpu.VMEM((bq, 128), jnp.float32),
              pltpu.VMEM((bq, 128), jnp.float32),
              pltpu.VMEM((bq, d), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((bsz, hq, lp, d), q.dtype),
          jax.ShapeDtypeStruct((bsz, hq, 1, lp), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mot_flash_fwd",
  )(kv_idx, kv_full, kv_cnt, q, k, v, qm, km)
  return o, lse


# --------------------------------------------------------------------------------------------
# Backward: dQ
# --------------------------------------------------------------------------------------------


def _dq_kernel(kv_idx_ref, kv_full_ref, kv_cnt_ref,
               q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
               dq_ref,
               acc_scr,
               *, scale, nq, nk):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i
  cnt = kv_cnt_ref[row]
  is_full = kv_full_ref[row * nk + t]

  @pl.when(t == 0)
  def _init():
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def step(masked: bool):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    do = do_ref[...]
    s = _dot_nt(q, k)
    s = s * scale
    lse = lse_ref[0][:, None]
    di = di_ref[0][:, None]
    p = jnp.exp(s - lse)
    if masked:
      mask = _mask(qm_ref[_SAMPLE][:, None], qm_ref[_SEGMENT][:, None], qm_ref[_ORDER][:, None],
                   km_ref[_SAMPLE][None, :], km_ref[_SEGMENT][None, :], km_ref[_ORDER][None, :],
                   km_ref[_KCODE][None, :])
      p = jnp.where(mask, p, 0.0)
    dp = _dot_nt(do, v)
    ds = p * (dp - di) * scale
    acc_scr[...] += _dot_nn(ds.astype(k.dtype), k)

  @pl.when((t < cnt) & (is_full == 0))
  def _partial():
    step(masked=True)

  @pl.when((t < cnt) & (is_full != 0))
  def _full():
    step(masked=False)

  @pl.when(t == nk - 1)
  def _finish():
    dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _dq(q, k, v, qm, km, do, lse, di, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  kv_idx = lists.index.reshape(-1)
  kv_full = lists.full.reshape(-1)
  kv_cnt = lists.count.reshape(-1)

  def kv_map(b, h, i, t, idx, full, cnt):
    return b, h // group, idx[(b * nq + i) * nk + t], 0

  def km_map(b, h, i, t, idx, full, cnt):
    return b, 0, idx[(b * nq + i) * nk + t]

  q_map = lambda b, h, i, t, *_: (b, h, i, 0)
  row_map = lambda b, h, i, t, *_: (b, h, 0, i)
  kernel = functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hq, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, 4, bq), lambda b, h, i, t, *_: (b, 0, i)),
              pl.BlockSpec((None, 4, bk), km_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
          ],
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((bsz, hq, lp, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mot_flash_dq",
  )(kv_idx, kv_full, kv_cnt, q, k, v, qm, km, do, lse, di)


# --------------------------------------------------------------------------------------------
# Backward: dK, dV (transposed tiles: keys in sublanes, queries in lanes)
# --------------------------------------------------------------------------------------------


def _dkv_kernel(q_idx_ref, q_full_ref, q_cnt_ref,
                q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref,
                dk_scr, dv_scr,
                *, scale, nq, nk, group):
  b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  row = b * nk + j
  cnt = q_cnt_ref[row]
  is_full = q_full_ref[row * nq + t]

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  def step(masked: bool):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    do = do_ref[...]
    st = _dot_nt(k, q)
    st = st * scale  # [bk, bq]
    pt = jnp.exp(st - lse_ref[...])  # lse row [1, bq]
    if masked:
      mask = _mask(qm_ref[_SAMPLE:_SAMPLE + 1, :], qm_ref[_SEGMENT:_SEGMENT + 1, :],
                   qm_ref[_ORDER:_ORDER + 1, :],
                   km_ref[_SAMPLE][:, None], km_ref[_SEGMENT][:, None], km_ref[_ORDER][:, None],
                   km_ref[_KCODE][:, None])
      pt = jnp.where(mask, pt, 0.0)
    dv_scr[...] += _dot_nn(pt.astype(do.dtype), do)
    dpt = _dot_nt(v, do)
    dst = pt * (dpt - di_ref[...]) * scale
    dk_scr[...] += _dot_nn(dst.astype(q.dtype), q)

  @pl.when((t < cnt) & (is_full == 0))
  def _partial():
    step(masked=True)

  @pl.when((t < cnt) & (is_full != 0))
  def _full():
    step(masked=False)

  @pl.when((g == group - 1) & (t == nq - 1))
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(q, k, v, qm, km, do, lse, di, lists_t: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  q_idx = lists_t.index.reshape(-1)
  q_full = lists_t.full.reshape(-1)
  q_cnt = lists_t.count.reshape(-1)

  def qi(b, j, t, idx):
    return idx[(b * nk + j) * nq + t]

  q_map = lambda b, h, j, g, t, idx, *_: (b, h * group + g, qi(b, j, t, idx), 0)
  row_map = lambda b, h, j, g, t, idx, *_: (b, h * group + g, 0, qi(b, j, t, idx))
  qm_map = lambda b, h, j, g, t, idx, *_: (b, 0, qi(b, j, t, idx))
  kv_map = lambda b, h, j, g, t, *_: (b, h, j, 0)
  km_map = lambda b, h, j, g, t, *_: (b, 0, j)
  kernel = functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, group=group)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hkv, nk, group, nq),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, 4, bq), qm_map),
              pl.BlockSpec((None, 4, bk), km_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
          ],
          out_specs=[pl.BlockSpec((None, None, bk, d), kv_map),
                     pl.BlockSpec((None, None, bk, d), kv_map)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="mot_flash_dkv",
  )(q_idx, q_full, q_cnt, q, k, v, qm, km, do, lse, di)


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
  per_head_fwd = bq * (4 * d * itemsize + 2 * 128 * 4 + d * 4)
  per_head_dq = bq * (6 * d * itemsize + d * 4 + 4 * 8 * 4)
  best = 1
  for gc in range(1, group + 1):
    if group % gc == 0 and fixed + gc * max(per_head_fwd, per_head_dq) <= VMEM_BUDGET:
      best = gc
  return best


def _fwd_kernel_dma(kv_idx_ref, kv_full_ref, kv_cnt_ref,
                    q_ref, qm_ref, k_hbm, v_hbm, km_hbm,
                    o_ref, lse_ref,
                    kbuf, vbuf, kmbuf, sem, m_scr, l_scr, acc_scr,
                    *, scale, nq, nk, bq, bk, group, chunks):
  """One program = one query block of ``group`` query heads sharing one KV head (a chunk of the
  GQA group): each K/V tile is copied once and its mask evaluated once for those heads."""
  b, hc, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hk = hc // chunks
  row = b * nq + i
  cnt = kv_cnt_ref[row]
  m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
  l_scr[...] = jnp.zeros_like(l_scr)
  acc_scr[...] = jnp.zeros_like(acc_scr)

  def srcs_at(t):
    start = pl.multiple_of(kv_idx_ref[row * nk + t] * bk, bk)
    return (k_hbm.at[b, hk, pl.ds(start, bk)], v_hbm.at[b, hk, pl.ds(start, bk)],
            km_hbm.at[b, :, pl.ds(start, bk)])

  def body(t, slot):
    km = kmbuf.at[slot]

    def step(masked):
      k = kbuf[slot]
      v = vbuf[slot]
      if masked:
        mask = _mask(qm_ref[_SAMPLE][:, None], qm_ref[_SEGMENT][:, None], qm_ref[_ORDER][:, None],
                     km[_SAMPLE][None, :], km[_SEGMENT][None, :], km[_ORDER][None, :],
                     km[_KCODE][None, :])

      def head(g, carry):
        s = _dot_nt(q_ref[g], k) * scale
        if masked:
          s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[g][:, :1]
        l_prev = l_scr[g][:, :1]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_next)
        if masked:
          p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        m_scr[g] = jnp.broadcast_to(m_next, (bq, 128))
        l_scr[g] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True),
                                    (bq, 128))
        acc_scr[g] = alpha * acc_scr[g] + _dot_nn(p.astype(v.dtype), v)
        return carry

      lax.fori_loop(0, group, head, 0)

    is_full = kv_full_ref[row * nk + t]
    pl.when(is_full == 0)(lambda: step(True))
    pl.when(is_full != 0)(lambda: step(False))

  _double_buffered_loop(cnt, srcs_at, (kbuf, vbuf, kmbuf), sem, body)

  def finish(g, carry):
    l = l_scr[g][:, :1]
    seen = l > 0.0
    o_ref[g] = (acc_scr[g] * jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
                ).astype(o_ref.dtype)
    lse = jnp.where(seen, m_scr[g][:, :1] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    lse_ref[g] = jnp.broadcast_to(lse, (bq, 128)).T[:1, :]
    return carry

  lax.fori_loop(0, group, finish, 0)


def _fwd_dma(q, k, v, qm, km, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  gc = _group_chunk(hq // hkv, bq, bk, d, q.dtype.itemsize)
  chunks = hq // hkv // gc
  nq, nk = lp // bq, lp // bk
  kernel = functools.partial(_fwd_kernel_dma, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk,
                             group=gc, chunks=chunks)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  # free reshape: query heads hk*G + c*gc + [0, gc) share KV head hk
  qg = q.reshape(bsz, hkv * chunks, gc, lp, d)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hkv * chunks, nq),
          in_specs=[
              pl.BlockSpec((None, None, gc, bq, d), lambda b, h, i, *_: (b, h, 0, i, 0)),
              pl.BlockSpec((None, 4, bq), lambda b, h, i, *_: (b, 0, i)),
              hbm, hbm, hbm,
          ],
          out_specs=[
              pl.BlockSpec((None, None, gc, bq, d), lambda b, h, i, *_: (b, h, 0, i, 0)),
              pl.BlockSpec((None, None, gc, 1, bq), lambda b, h, i, *_: (b, h, 0, 0, i)),
          ],
          scratch_shapes=[
              pltpu.VMEM((2, bk, d), k.dtype),
              pltpu.VMEM((2, bk, d), v.dtype),
              pltpu.VMEM((2, 4, bk), jnp.int32),
              pltpu.SemaphoreType.DMA((3, 2)),
              pltpu.VMEM((gc, bq, 128), jnp.float32),
              pltpu.VMEM((gc, bq, 128), jnp.float32),
              pltpu.VMEM((gc, bq, d), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((bsz, hkv * chunks, gc, lp, d), q.dtype),
          jax.ShapeDtypeStruct((bsz, hkv * chunks, gc, 1, lp), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="mot_flash_fwd_dma",
  )(lists.index.reshape(-1), lists.full.reshape(-1), lists.count.reshape(-1), qg, qm, k, v, km)
  return o.reshape(bsz, hq, lp, d), lse.reshape(bsz, hq, 1, lp)


def _dq_kernel_dma(kv_idx_ref, kv_full_ref, kv_cnt_ref,
                   q_ref, qm_ref, do_ref, lse_ref, di_ref, k_hbm, v_hbm, km_hbm,
                   dq_ref,
                   kbuf, vbuf, kmbuf, sem, acc_scr,
                   *, scale, nq, nk, bk, group, chunks):
  """Like the forward: one program per (query block, chunk of a GQA group)."""
  b, hc, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hk = hc // chunks
  row = b * nq + i
  cnt = kv_cnt_ref[row]
  acc_scr[...] = jnp.zeros_like(acc_scr)

  def srcs_at(t):
    start = pl.multiple_of(kv_idx_ref[row * nk + t] * bk, bk)
    return (k_hbm.at[b, hk, pl.ds(start, bk)], v_hbm.at[b, hk, pl.ds(start, bk)],
            km_hbm.at[b, :, pl.ds(start, bk)])

  def body(t, slot):
    km = kmbuf.at[slot]

    def step(masked):
      k = kbuf[slot]
      v = vbuf[slot]
      if masked:
        mask = _mask(qm_ref[_SAMPLE][:, None], qm_ref[_SEGMENT][:, None], qm_ref[_ORDER][:, None],
                     km[_SAMPLE][None, :], km[_SEGMENT][None, :], km[_ORDER][None, :],
                     km[_KCODE][None, :])

      def head(g, carry):
        p = jnp.exp(_dot_nt(q_ref[g], k) * scale - lse_ref[g][0][:, None])
        if masked:
          p = jnp.where(mask, p, 0.0)
        ds = p * (_dot_nt(do_ref[g], v) - di_ref[g][0][:, None]) * scale
        acc_scr[g] = acc_scr[g] + _dot_nn(ds.astype(k.dtype), k)
        return carry

      lax.fori_loop(0, group, head, 0)

    is_full = kv_full_ref[row * nk + t]
    pl.when(is_full == 0)(lambda: step(True))
    pl.when(is_full != 0)(lambda: step(False))

  _double_buffered_loop(cnt, srcs_at, (kbuf, vbuf, kmbuf), sem, body)
  dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _dq_dma(q, k, v, qm, km, do, lse, di, lists: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  gc = _group_chunk(hq // hkv, bq, bk, d, q.dtype.itemsize)
  chunks = hq // hkv // gc
  nq, nk = lp // bq, lp // bk
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  grouped = lambda x: x.reshape(bsz, hkv * chunks, gc, *x.shape[2:])
  q_map = lambda b, h, i, *_: (b, h, 0, i, 0)
  row_map = lambda b, h, i, *_: (b, h, 0, 0, i)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel_dma, scale=scale, nq=nq, nk=nk, bk=bk, group=gc,
                        chunks=chunks),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hkv * chunks, nq),
          in_specs=[
              pl.BlockSpec((None, None, gc, bq, d), q_map),
              pl.BlockSpec((None, 4, bq), lambda b, h, i, *_: (b, 0, i)),
              pl.BlockSpec((None, None, gc, bq, d), q_map),
              pl.BlockSpec((None, None, gc, 1, bq), row_map),
              pl.BlockSpec((None, None, gc, 1, bq), row_map),
              hbm, hbm, hbm,
          ],
          out_specs=pl.BlockSpec((None, None, gc, bq, d), q_map),
          scratch_shapes=[
              pltpu.VMEM((2, bk, d), k.dtype),
              pltpu.VMEM((2, bk, d), v.dtype),
              pltpu.VMEM((2, 4, bk), jnp.int32),
              pltpu.SemaphoreType.DMA((3, 2)),
              pltpu.VMEM((gc, bq, d), jnp.float32),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct((bsz, hkv * chunks, gc, lp, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="mot_flash_dq_dma",
  )(lists.index.reshape(-1), lists.full.reshape(-1), lists.count.reshape(-1),
    grouped(q), qm, grouped(do), grouped(lse), grouped(di), k, v, km)
  return dq.reshape(bsz, hq, lp, d)


def _dkv_kernel_dma(q_idx_ref, q_full_ref, q_cnt_ref,
                    k_ref, v_ref, km_ref, q_hbm, do_hbm, lse_hbm, di_hbm, qm_hbm,
                    dk_ref, dv_ref,
                    qbuf, dobuf, lsebuf, dibuf, qmbuf, sem, dk_scr, dv_scr,
                    *, scale, nq, nk, bq, group):
  b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = b * nk + j
  cnt = q_cnt_ref[row]
  dk_scr[...] = jnp.zeros_like(dk_scr)
  dv_scr[...] = jnp.zeros_like(dv_scr)
  safe_cnt = jnp.maximum(cnt, 1)

  def srcs_at(u):  # u enumerates (query head g of the group, t-th listed query block)
    g, t = u // safe_cnt, lax.rem(u, safe_cnt)
    h = hk * group + g
    start = pl.multiple_of(q_idx_ref[row * nq + t] * bq, bq)
    return (q_hbm.at[b, h, pl.ds(start, bq)], do_hbm.at[b, h, pl.ds(start, bq)],
            lse_hbm.at[b, h, :, pl.ds(start, bq)], di_hbm.at[b, h, :, pl.ds(start, bq)],
            qm_hbm.at[b, :, pl.ds(start, bq)])

  def body(u, slot):
    qm = qmbuf.at[slot]

    def step(masked):
      q = qbuf[slot]
      do = dobuf[slot]
      k = k_ref[...]
      pt = jnp.exp(_dot_nt(k, q) * scale - lsebuf[slot])  # [bk, bq]
      if masked:
        mask = _mask(qm[_SAMPLE:_SAMPLE + 1, :], qm[_SEGMENT:_SEGMENT + 1, :],
                     qm[_ORDER:_ORDER + 1, :],
                     km_ref[_SAMPLE][:, None], km_ref[_SEGMENT][:, None],
                     km_ref[_ORDER][:, None], km_ref[_KCODE][:, None])
        pt = jnp.where(mask, pt, 0.0)
      dv_scr[...] += _dot_nn(pt.astype(do.dtype), do)
      dst = pt * (_dot_nt(v_ref[...], do) - dibuf[slot]) * scale
      dk_scr[...] += _dot_nn(dst.astype(q.dtype), q)

    is_full = q_full_ref[row * nq + lax.rem(u, safe_cnt)]
    pl.when(is_full == 0)(lambda: step(True))
    pl.when(is_full != 0)(lambda: step(False))

  _double_buffered_loop(cnt * group, srcs_at, (qbuf, dobuf, lsebuf, dibuf, qmbuf), sem, body)
  dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
  dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv_dma(q, k, v, qm, km, do, lse, di, lists_t: bs.BlockLists, *, scale, bq, bk, interpret):
  bsz, hq, lp, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  nq, nk = lp // bq, lp // bk
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  kv_map = lambda b, h, j, *_: (b, h, j, 0)
  return pl.pallas_call(
      functools.partial(_dkv_kernel_dma, scale=scale, nq=nq, nk=nk, bq=bq, group=group),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(bsz, hkv, nk),
          in_specs=[
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, 4, bk), lambda b, h, j, *_: (b, 0, j)),
              hbm, hbm, hbm, hbm, hbm,
          ],
          out_specs=[pl.BlockSpec((None, None, bk, d), kv_map),
                     pl.BlockSpec((None, None, bk, d), kv_map)],
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
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="mot_flash_dkv_dma",
  )(lists_t.index.reshape(-1), lists_t.full.reshape(-1), lists_t.count.reshape(-1),
    k, v, km, q, do, lse, di, qm)


# --------------------------------------------------------------------------------------------
# custom_vjp over the kernel layout
# --------------------------------------------------------------------------------------------


_KERNELS = {"dma": (_fwd_dma, _dq_dma, _dkv_dma), "grid": (_fwd, _dq, _dkv)}
PIPELINES = tuple(_KERNELS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, qm, km, fwd_lists, bwd_lists, scale, bq, bk, interpret, pipeline):
  fwd = _KERNELS[pipeline][0]
  o, _ = fwd(q, k, v, qm, km, fwd_lists, scale=scale, bq=bq, bk=bk, interpret=interpret)
  return o


def _flash_fwd(q, k, v, qm, km, fwd_lists, bwd_lists, scale, bq, bk, interpret, pipeline):
  fwd = _KERNELS[pipeline][0]
  o, lse = fwd(q, k, v, qm, km, fwd_lists, scale=scale, bq=bq, bk=bk, interpret=interpret)
  return o, (q, k, v, qm, km, fwd_lists, bwd_lists, o, lse)


def _flash_bwd(scale, bq, bk, interpret, pipeline, res, do):
  q, k, v, qm, km, fwd_lists, bwd_lists, o, lse = res
  _, dq_fn, dkv_fn = _KERNELS[pipeline]
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]
  dq = dq_fn(q, k, v, qm, km, do, lse, di, fwd_lists, scale=scale, bq=bq, bk=bk,
             interpret=interpret)
  dk, dv = dkv_fn(q, k, v, qm, km, do, lse, di, bwd_lists, scale=scale, bq=bq, bk=bk,
                  interpret=interpret)
  zeros = lambda tree: jax.tree.map(
      lambda x: np.zeros(x.shape, jax.dtypes.float0), tree)
  return dq, dk, dv, zeros(qm), zeros(km), zeros(fwd_lists), zeros(bwd_lists)


_flash.defvjp(_flash_fwd, _flash_bwd)


def plan(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int):
  """Tile classes and the forward / transposed block lists for padded metadata."""
  classes = bs.classify_meta(q_meta, k_meta, block_q, block_k)
  return classes, bs.block_lists(classes), bs.block_lists(jnp.swapaxes(classes, 1, 2))


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
    pipeline: str | None = None,
) -> jax.Array:  # [B, L, Hq, D]
  """Fused MoT attention (self-attention: ``Lq == Lk``), differentiable in q, k, v.

  ``pipeline=None`` uses ``DEFAULT_PIPELINE``. ``"dma"`` (default): each program loops over only its listed tiles with manual
  double-buffered copies, so skipped tiles cost nothing. ``"grid"``: the listed tiles are walked
  by the innermost grid axis through BlockSpec index maps (padding steps issue no copy and no
  compute but still cost a grid step). ``interpret=True`` runs on the CPU (for "dma" through the
  TPU interpreter, which simulates DMAs and semaphores).

  Lengths that are not a multiple of the block sizes are padded with padding tokens and sliced
  back; block sizes are clipped to the padded length so short inputs use one tile.
  """
  k_meta = q_meta if k_meta is None else k_meta
  bsz, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if lq != lk:
    raise ValueError(f"self-attention kernel needs Lq == Lk, got {lq} and {lk}")
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
  scale = float(d**-0.5 if scale is None else scale)
  step = int(np.lcm(block_q, block_k))
  if lq <= step:  # a single tile: shrink it to the (lane-aligned) length
    block_q = block_k = step = _round_up(lq, 128)
  lp = _round_up(lq, step)
  pad = lp - lq
  qm_ = pad_meta(q_meta, lp)
  km_ = pad_meta(k_meta, lp)
  _, fwd_lists, bwd_lists = plan(qm_, km_, block_q, block_k)
  qm = pack_meta(qm_, side="q")
  km = pack_meta(km_, side="k")

  def to_kernel(x):
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
    return jnp.swapaxes(x, 1, 2)

  pipeline = DEFAULT_PIPELINE if pipeline is None else pipeline
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
  if interpret is True and pipeline == "dma":
    interpret = pltpu.InterpretParams()
  o = _flash(to_kernel(q), to_kernel(k), to_kernel(v), qm, km, fwd_lists, bwd_lists,
             scale, block_q, block_k, interpret, pipeline)
  return jnp.swapaxes(o, 1, 2)[:, :lq]
