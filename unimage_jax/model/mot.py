"""The Mixture-of-Transformers decoder: per layer an *und* and a *gen* expert, one joint attention.

Layout (see ``unimage_jax.layout``): hidden states travel as two buffers, ``h_und [B, Lu, E]`` and
``h_gen [B, Lg, E]``. In every layer each expert normalises and projects *only its own buffer*
(dense, static shapes, zero wasted expert FLOPs); q/k/v of both buffers are concatenated along the
length axis (``L = Lu + Lg``) for one attention call whose visibility comes from per-token
metadata; the attention output is split back and each expert applies its own o_proj, residual,
post-attention norm and MLP. Layers are stacked (leading ``layers`` axis on every parameter) and
run with ``lax.scan`` so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unimage_jax.attention import dispatch as attention_dispatch
from unimage_jax.attention import mesh_context
from unimage_jax.layout import TokenMeta
from unimage_jax import sharding
from unimage_jax.config_validation import context_parallel
from unimage_jax.model import constraints, layers, row_shards, stacking
from unimage_jax.model.positional import apply_rope



def model_attention(q, k, v, meta: TokenMeta, cfg: ml_collections.ConfigDict):
  """The row's joint attention with ``cfg.attention_impl``; Pallas kernels run per shard
  (``shard_map``) when a step is traced under :func:`mesh_context.attention_mesh`."""
  impl = attention_dispatch.resolve_impl(cfg.attention_impl)
  mesh = mesh_context.current_mesh()
  if mesh is not None and sharding.length_shards(mesh, mesh_context.current_rules()) > 1:
    from unimage_jax.attention.context_parallel import context_parallel_attention
    # rows split over the sequence axis: every impl runs per shard against the all-gathered K/V
    interpret = mesh.devices.flat[0].platform == "cpu"
    kwargs = {} if impl in attention_dispatch.XLA_IMPLS else {"interpret": interpret}
    if impl == "xla":
      kwargs["query_chunk"] = cfg.attention_query_chunk
    return context_parallel_attention(q, k, v, meta, mesh=mesh, impl=impl,
                                      strategy=context_parallel(cfg), **kwargs)
  if impl not in attention_dispatch.XLA_IMPLS and mesh is not None and mesh.size > 1:
    from unimage_jax.attention.sharded import sharded_attention
    # interpret mode only where the mesh's devices are CPUs (tests); real kernels for TPU/GPU meshes,
    # including topology descriptions compiled ahead of time on a CPU host
    interpret = mesh.devices.flat[0].platform == "cpu"
    return sharded_attention(q, k, v, meta, mesh=mesh, impl=impl, interpret=interpret)
  return attention_dispatch.attention(q, k, v, meta, impl=impl, query_chunk=cfg.attention_query_chunk)


class ExpertAttentionProj(nnx.Module):
  """One expert's attention projections: q/k/v with bias, o without, per-head q/k RMSNorm."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype: jnp.dtype, rngs: nnx.Rngs):
    e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.q_proj = layers.Dense([e], [hq, d], ["embed"], ["heads", "head_dim"], use_bias=True, **kw)
    self.k_proj = layers.Dense([e], [hkv, d], ["embed"], ["kv_heads", "head_dim"], use_bias=True, **kw)
    self.v_proj = layers.Dense([e], [hkv, d], ["embed"], ["kv_heads", "head_dim"], use_bias=True, **kw)
    self.o_proj = layers.Dense([hq, d], [e], ["heads", "head_dim"], ["embed"], use_bias=False, **kw)
    self.q_norm = layers.RMSNorm(d, cfg.rms_norm_eps, "head_dim", dtype, rngs) if cfg.qk_norm else None
    self.k_norm = layers.RMSNorm(d, cfg.rms_norm_eps, "head_dim", dtype, rngs) if cfg.qk_norm else None

  def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, dtype: jnp.dtype):
    """x [B, l, E] -> q [B, l, Hq, D], k/v [B, l, Hkv, D] (q, k normed then rotated)."""
    q, k, v = self.q_proj(x, dtype), self.k_proj(x, dtype), self.v_proj(x, dtype)
    q = constraints.constrain(q, constraints.QUERY)
    k, v = (constraints.constrain(a, constraints.KEY_VALUE) for a in (k, v))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Expert(nnx.Module):
  """All weights one expert owns in one layer (Qwen2 layer shapes)."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype, rngs)
    self.self_attn = ExpertAttentionProj(cfg, dtype, rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype, rngs)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.mlp_dim, dtype, rngs)


class MoTLayer(nnx.Module):
  """One decoder layer: two experts, one joint attention over ``[und | gen]``."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.und = Expert(cfg, dtype, rngs)
    self.gen = nnx.clone(self.und)  # BAGEL initialises the gen expert as a copy of und

  def _qkv(self, h_und, h_gen, rope_und, rope_gen, dtype):
    """Each expert projects only its own buffer; results are concatenated along length."""
    q_u, k_u, v_u = self.und.self_attn.qkv(self.und.input_layernorm(h_und), *rope_und, dtype)
    q_g, k_g, v_g = self.gen.self_attn.qkv(self.gen.input_layernorm(h_gen), *rope_gen, dtype)
    shards = row_shards.length_shards(h_und.shape[1], h_gen.shape[1])
    q = constraints.constrain(row_shards.join(q_u, q_g, shards), constraints.QUERY)
    k, v = (constraints.constrain(row_shards.join(a, b, shards), constraints.KEY_VALUE)
            for a, b in ((k_u, k_g), (v_u, v_g)))
    return q, k, v  # [B, Lu+Lg, H, D], shard i = [und_i | gen_i] (row_shards.py)

  def _finish(self, h_und, h_gen, attn, dtype):
    """Per-expert o_proj, residual, post-attention norm and MLP on the attention output."""
    lu = h_und.shape[1]
    attn = checkpoint_name(constraints.constrain(attn, constraints.QUERY), "attention_out")
    a_und, a_gen = row_shards.split(attn, lu, row_shards.length_shards(lu, h_gen.shape[1]))
    h_und = h_und + self.und.self_attn.o_proj(a_und, dtype).astype(h_und.dtype)
    h_gen = h_gen + self.gen.self_attn.o_proj(a_gen, dtype).astype(h_gen.dtype)
    h_und = h_und + self.und.mlp(self.und.post_attention_layernorm(h_und), dtype).astype(h_und.dtype)
    h_gen = h_gen + self.gen.mlp(self.gen.post_attention_layernorm(h_gen), dtype).astype(h_gen.dtype)
    return h_und, h_gen

  def __call__(self, h_und, h_gen, rope_und, rope_gen, meta: TokenMeta, cfg, compute_dtype):
    """h_und [B, Lu, E], h_gen [B, Lg, E] -> same shapes (self-attention over the packed row)."""
    h_und, h_gen = (constraints.constrain(h, constraints.HIDDEN) for h in (h_und, h_gen))
    q, k, v = self._qkv(h_und, h_gen, rope_und, rope_gen, compute_dtype)
    return self._finish(h_und, h_gen, model_attention(q, k, v, meta, cfg), compute_dtype)  # attn [B, L, Hq, D]

  def extend(self, h_und, h_gen, rope_und, rope_gen, meta: TokenMeta, past_k, past_v, past_meta: TokenMeta,
             cfg, compute_dtype):
    """New tokens attend to a KV cache plus themselves; returns hiddens and the new tokens' k/v.

    past_k/past_v [B, P, Hkv, D] with ``past_meta`` fields [B, P] (empty slots are padding).
    """
    q, k, v = self._qkv(h_und, h_gen, rope_und, rope_gen, compute_dtype)
    keys = TokenMeta(*(jnp.concatenate([a, b], axis=1) for a, b in zip(past_meta, meta)))
    attn = attention_dispatch.attention(
        q, jnp.concatenate([past_k.astype(k.dtype), k], axis=1), jnp.concatenate([past_v.astype(v.dtype), v], axis=1),
        meta, keys, impl="xla", query_chunk=cfg.attention_query_chunk)
    h_und, h_gen = self._finish(h_und, h_gen, attn, compute_dtype)
    return h_und, h_gen, k, v


class MoTDecoder(nnx.Module):
  """``num_layers`` stacked MoT layers plus the final RMSNorm of each expert."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layers = stacking.stack_modules(lambda r: MoTLayer(cfg, r), cfg.num_layers, rngs)
    dtype = jnp.dtype(cfg.param_dtype)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype, rngs)
    self.norm_moe_gen = nnx.clone(self.norm)

  def __call__(self, h_und, h_gen, rope_und, rope_gen, meta: TokenMeta):
    """h_und [B, Lu, E], h_gen [B, Lg, E] -> final-normed hidden states of both buffers."""
    cfg = self.cfg
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    apply = lambda layer, carry: layer(*carry, rope_und, rope_gen, meta, cfg, compute_dtype)
    h_und, h_gen = stacking.run_stacked(
        self.layers, (h_und, h_gen), apply, scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
    return self.norm(h_und), self.norm_moe_gen(h_gen)

  def extend(self, h_und, h_gen, rope_und, rope_gen, meta: TokenMeta, cache_k, cache_v, cache_meta: TokenMeta):
    """Runs new tokens against a KV cache (``cache_k/v [layers, B, P, Hkv, D]``).

    Returns the final-normed hiddens of both buffers and the new tokens' per-layer k/v
    ``[layers, B, Lu+Lg, Hkv, D]`` for the caller to append to the cache.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)

    def apply(layer, carry, past):  # past: this layer's (k, v) cache, each [B, P, Hkv, D]
      h_u, h_g, k, v = layer.extend(*carry, rope_und, rope_gen, meta, *past, cache_meta, cfg, dtype)
      return (h_u, h_g), (k, v)

    # inference only: nothing is differentiated, so there is nothing to rematerialise
    (h_und, h_gen), (new_k, new_v) = stacking.scan_stacked(
        self.layers, (h_und, h_gen), apply, (cache_k, cache_v), scan=cfg.scan_layers, remat_policy="none")
    return self.norm(h_und), self.norm_moe_gen(h_gen), new_k, new_v
