"""SigLIP-style NaViT vision encoder: packed patches of several images, full attention per image.

Patch embedding is a Linear over pixels flattened in ``(p, p, c)`` order (BAGEL stores SigLIP's
conv this way); a learned position embedding over a ``70 x 70`` grid is indexed by each patch's
``row * 70 + col``. Images attend only to themselves: the encoder reuses the MoT attention with
every image as one full (``KIND_VIT``) segment, so no per-image padding is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unimage_jax import layout
from unimage_jax.attention.reference import reference_attention
from unimage_jax.layout import TokenMeta
from unimage_jax.model import layers, stacking


class SiglipAttention(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, dtype: jnp.dtype, rngs: nnx.Rngs):
    e, h = cfg.hidden_size, cfg.num_heads
    d = e // h
    kw = dict(use_bias=True, param_dtype=dtype, rngs=rngs)
    self.q_proj = layers.Dense([e], [h, d], ["vit_embed"], ["vit_heads", "head_dim"], **kw)
    self.k_proj = layers.Dense([e], [h, d], ["vit_embed"], ["vit_heads", "head_dim"], **kw)
    self.v_proj = layers.Dense([e], [h, d], ["vit_embed"], ["vit_heads", "head_dim"], **kw)
    self.out_proj = layers.Dense([h, d], [e], ["vit_heads", "head_dim"], ["vit_embed"], **kw)

  def __call__(self, x, meta: TokenMeta, dtype):
    q, k, v = self.q_proj(x, dtype), self.k_proj(x, dtype), self.v_proj(x, dtype)
    return self.out_proj(reference_attention(q, k, v, meta), dtype)


class SiglipLayer(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, dtype: jnp.dtype, rngs: nnx.Rngs):
    e, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.layer_norm1 = layers.LayerNorm(e, eps, "norm", dtype, rngs)
    self.self_attn = SiglipAttention(cfg, dtype, rngs)
    self.layer_norm2 = layers.LayerNorm(e, eps, "norm", dtype, rngs)
    kw = dict(use_bias=True, param_dtype=dtype, rngs=rngs)
    self.fc1 = layers.Dense([e], [cfg.mlp_dim], ["vit_embed"], ["vit_mlp"], **kw)
    self.fc2 = layers.Dense([cfg.mlp_dim], [e], ["vit_mlp"], ["vit_embed"], **kw)

  def __call__(self, x, meta: TokenMeta, dtype):
    x = x + self.self_attn(self.layer_norm1(x), meta, dtype).astype(x.dtype)
    h = jax.nn.gelu(self.fc1(self.layer_norm2(x), dtype), approximate=True)
    return x + self.fc2(h, dtype).astype(x.dtype)


class SiglipVisionEncoder(nnx.Module):
  """Packed patches ``[B, Nv, p*p*3]`` -> features ``[B, Nv, vit_hidden]``."""

  def __init__(self, cfg: ml_collections.ConfigDict, param_dtype: str, scan: bool, rngs: nnx.Rngs):
    dtype = jnp.dtype(param_dtype)
    self.cfg, self.scan = cfg, scan
    e = cfg.hidden_size
    patch_dim = cfg.patch_size * cfg.patch_size * 3
    self.patch_embedding = layers.Dense([patch_dim], [e], ["vit_patch"], ["vit_embed"], use_bias=True,
                                        param_dtype=dtype, rngs=rngs)
    self.position_embedding = layers.make_param(
        rngs, layers.normal_init, [cfg.max_patches_per_side**2, e], [None, "vit_embed"], dtype)
    self.layers = stacking.stack_modules(lambda r: SiglipLayer(cfg, dtype, r), cfg.num_layers, rngs)
    self.post_layernorm = layers.LayerNorm(e, cfg.layer_norm_eps, "norm", dtype, rngs)

  def __call__(self, patches, pos_ids, image_ids, compute_dtype, remat_policy: str = "none"):
    """patches [B, Nv, P], pos_ids/image_ids [B, Nv] (image id -1 = padding)."""
    x = self.patch_embedding(patches, compute_dtype)
    x = x + jnp.take(self.position_embedding[...], pos_ids, axis=0).astype(x.dtype)
    valid = image_ids >= 0
    meta = TokenMeta(
        sample_ids=image_ids,
        segment_ids=image_ids,
        segment_kinds=jnp.where(valid, layout.KIND_VIT, layout.KIND_PAD).astype(jnp.int32),
        orders=jnp.broadcast_to(jnp.arange(image_ids.shape[1], dtype=jnp.int32), image_ids.shape),
    )
    x = stacking.run_stacked(self.layers, x, lambda layer, h: layer(h, meta, compute_dtype),
                             scan=self.scan, remat_policy=remat_policy)
    return self.post_layernorm(x)
