"""Context-parallel MoT attention: rows split over the ``sequence`` axis, K/V all-gathered.

Each device of the ``sequence`` axis holds ``L / S`` query slots of a row (``model/row_shards.py``:
its own und and gen slots). Inside ``shard_map`` the device all-gathers the row's keys, values and
key metadata over the axis and runs the local attention (any ``impl``: the Pallas kernels, the
XLA flash or the reference) for its queries against the whole row. The kernels' block summaries
then see the real metadata of every key block, so EMPTY tiles (other stories, keys after every
local query, noise seen from outside) are skipped exactly as in the unsplit row; no ``L x L``
tensor exists. The backward pass is the transpose: the local kernel's dK/dV for the whole row are
reduce-scattered (``psum_scatter``) back to the shards that own those keys.

Why all-gather rather than a ring (``ppermute`` of K/V blocks with a carried online softmax):
with grouped-query attention K and V are ``Hkv / Hq`` of the query size (bagel_7b: 4 of 28
heads), so the whole row's K/V per device is small next to the activations a layer keeps anyway
(README "Context parallelism" has the plan figures); the gathered row lets the existing kernels
and their block skipping run unchanged on arbitrary (metadata) masks, and there is one collective
per layer instead of ``S - 1`` dependent steps. A ring would bound K/V memory by ``2 L / S``
instead of ``L``, which matters only once ``L * Hkv * D`` per layer approaches HBM.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from unimage_jax.attention import mesh_context
from unimage_jax.attention.dispatch import XLA_IMPLS, attention
from unimage_jax.choices import CONTEXT_PARALLEL as STRATEGIES
from unimage_jax.layout import KIND_PAD, TokenMeta


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def cp_specs(q_shape, rules, mesh: Mesh) -> tuple[P, P]:
  """(q/k/v spec ``[B, L, H, D]``, metadata spec ``[B, L]``): rows by ``batch``, length by
  ``length`` (the sequence axis), heads by ``act_heads``; head_dim must stay whole."""
  from unimage_jax.model.constraints import QUERY
  from unimage_jax.sharding import logical_to_spec
  spec = logical_to_spec(QUERY, q_shape, rules, mesh)
  if spec[3] is not None:
    raise ValueError(f"config.logical_axis_rules shard the attention's head_dim ({spec}): map 'head_dim' to None")
  return spec, P(spec[0], spec[1])


def _pad_queries(q, q_meta: TokenMeta, length: int):
  """Pads local queries to the gathered key length (padding queries: kind 0, tiles skipped)."""
  pad = length - q.shape[1]
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  meta = TokenMeta(*(jnp.pad(x, ((0, 0), (0, pad)), constant_values=(KIND_PAD if i == 2 else -1))
                     for i, x in enumerate(q_meta)))
  return q, meta


def local_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, impl: str, **kwargs):
  """The shard's queries ``[b, l, Hq, D]`` against the whole row ``[b, L, Hkv, D]``.

  The Pallas kernels are self-attention kernels (``Lq == Lk``): the local queries are padded to
  ``L`` with padding tokens, whose query blocks have no listed key tile and cost nothing.
  """
  lq = q.shape[1]
  if impl not in XLA_IMPLS and lq != k.shape[1]:
    q, q_meta = _pad_queries(q, q_meta, k.shape[1])
    return attention(q, k, v, q_meta, k_meta, impl=impl, **kwargs)[:, :lq]
  return attention(q, k, v, q_meta, k_meta, impl=impl, **kwargs)


def context_parallel_attention(
    q: jax.Array,  # [B, L, Hq, D], L split over the sequence axis
    k: jax.Array,  # [B, L, Hkv, D]
    v: jax.Array,  # [B, L, Hkv, D]
    meta: TokenMeta,  # fields [B, L]
    *,
    mesh: Mesh,
    impl: str,
    rules=None,
    strategy: str = "all_gather",
    **attention_kwargs,
) -> jax.Array:  # [B, L, Hq, D]
  """Self-attention over rows whose length is split by the ``length`` rule (see module doc).

  ``strategy``: ``"all_gather"`` (default: K/V gathered, the local ``impl`` against the whole
  row) or ``"ring"`` (:mod:`ring`: K/V blocks passed around the axis, XLA flash tiles; for the
  XLA impls).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"context-parallel strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "ring" and impl not in XLA_IMPLS:
    raise ValueError(f"ring context parallelism runs the XLA flash tiles; attention impl {impl!r} needs "
                     "strategy 'all_gather'")
  rules = mesh_context.current_rules() if rules is None else rules
  act, meta_spec = cp_specs(q.shape, rules, mesh)
  seq = _axes(act[1])
  if not seq:
    raise ValueError("context_parallel_attention needs the 'length' rule to split rows over a mesh axis")
  hkv = k.shape[2]
  tp = math.prod(mesh.shape[a] for a in _axes(act[2]))
  if hkv % tp:  # GQA: query head h and its key/value head in one shard (see sharded.py)
    f = math.lcm(hkv, tp) // hkv
    k, v = jnp.repeat(k, f, axis=2), jnp.repeat(v, f, axis=2)
  gather = functools.partial(jax.lax.all_gather, axis_name=seq, axis=1, tiled=True)

  def per_shard(q, k, v, q_meta, k_meta):
    if strategy == "ring":
      from unimage_jax.attention.ring import ring_attention
      blocks = {n: attention_kwargs[n] for n in ("block_q", "block_k") if attention_kwargs.get(n)}
      return ring_attention(q, k, v, q_meta, k_meta, axis_name=seq, shards=math.prod(mesh.shape[a] for a in seq),
                            **blocks)
    k_all, v_all = gather(k), gather(v)  # [b, L, hkv, D]: the whole row
    k_meta_all = TokenMeta(*(gather(x) for x in k_meta))
    return local_attention(q, k_all, v_all, q_meta, k_meta_all, impl=impl, **attention_kwargs)

  metas = TokenMeta(*(meta_spec for _ in range(4)))
  wrapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(act, act, act, metas, metas), out_specs=act,
                          check_vma=False)
  return wrapped(q, k, v, TokenMeta(*meta), TokenMeta(*meta))
