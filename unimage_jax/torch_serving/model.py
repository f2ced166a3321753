"""A small PyTorch MoT module that serves exported UniMAGE/BAGEL weights on GPU or CPU without JAX.

Module names mirror BAGEL's state-dict keys (``language_model.model.layers.N.self_attn.q_proj``,
``..._moe_gen``, ``vit_model.vision_model...``), so ``load_state_dict(strict=True)`` on the exported
safetensors checks every key and shape. The forward pass takes one packed batch with the keys of
``unimage_jax.layout.empty_row`` (each with a leading batch axis) and follows the JAX model step by
step: und/gen buffers, each expert on its own buffer, one joint attention under the same
visibility rule (a dense boolean mask here: serving rows are short).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# The packed-row contract (kinds, the visibility rule); layout imports numpy only: no JAX here.
from unimage_jax.layout import KIND_PAD, KIND_VIT, TokenMeta, visible

X0_MIN_T = 0.05  # x0-prediction clip of t (unimage_jax.model.unimage.X0_MIN_T)


def visibility(sample_ids, segment_ids, kinds, orders, queries: slice = slice(None)) -> torch.Tensor:
  """Boolean ``[B, Lq, L]`` mask of docs/ARCHITECTURE.md §3 (``layout.visible``) from per-token
  ``[B, L]`` metadata, for the queries ``queries`` (all by default) against every key."""
  meta = (sample_ids, segment_ids, kinds, orders)
  return visible(TokenMeta(*(x[:, queries, None] for x in meta)), TokenMeta(*(x[:, None, :] for x in meta)))


def meta_attention(q, k, v, meta: tuple[torch.Tensor, ...], query_chunk: int | None = None) -> torch.Tensor:
  """Attention under the visibility rule of per-token ``meta`` (sample, segment, kind, order; ``[B, L]``).

  With ``query_chunk`` the ``[B, chunk, L]`` mask is built per block of queries, so long rows never
  hold an ``L x L`` mask; without it one dense mask serves the whole row.
  """
  length = q.shape[1]
  if query_chunk is None or query_chunk >= length:
    return masked_attention(q, k, v, visibility(*meta))
  outs = []
  for start in range(0, length, query_chunk):
    sl = slice(start, start + query_chunk)
    outs.append(masked_attention(q[:, sl], k, v, visibility(*meta, queries=sl)))
  return torch.cat(outs, dim=1)


def masked_attention(q, k, v, mask) -> torch.Tensor:
  """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk] -> [B, Lq, Hq, D]; rows seeing nothing give 0."""
  rep = q.shape[2] // k.shape[2]
  q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
  k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
  empty = ~mask.any(-1)  # [B, Lq] queries with no visible key (padding)
  first = torch.zeros_like(mask)
  first[..., 0] = True
  safe = mask | (empty[:, :, None] & first)  # give them one key so softmax stays finite
  out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None])
  out = out.transpose(1, 2)  # [B, L, Hq, D]
  return out.masked_fill(empty[:, :, None, None], 0.0)


def rope(positions: torch.Tensor, head_dim: int, theta: float):
  """HF cos/sin tables ``[B, L, D]`` in fp32."""
  inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
  freqs = positions.float()[..., None] * inv_freq
  emb = torch.cat([freqs, freqs], dim=-1)
  return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
  """rotate_half RoPE on ``x [B, L, H, D]`` in fp32."""
  half = x.shape[-1] // 2
  x32 = x.float()
  rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def timestep_sinusoid(t, dim: int = 256, max_period: float = 10000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[..., None] * freqs
  return torch.cat([args.cos(), args.sin()], dim=-1)


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (self.weight.float() * y).to(x.dtype)


class MLP(nn.Module):
  def __init__(self, hidden: int, mlp: int):
    super().__init__()
    self.gate_proj = nn.Linear(hidden, mlp, bias=False)
    self.up_proj = nn.Linear(hidden, mlp, bias=False)
    self.down_proj = nn.Linear(mlp, hidden, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
  """Both experts' projections, named as in BAGEL (``q_proj`` / ``q_proj_moe_gen`` ...)."""

  def __init__(self, c: Mapping):
    super().__init__()
    e, hq, hkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    self.hq, self.hkv, self.d = hq, hkv, d
    for moe in ("", "_moe_gen"):
      setattr(self, f"q_proj{moe}", nn.Linear(e, hq * d))
      setattr(self, f"k_proj{moe}", nn.Linear(e, hkv * d))
      setattr(self, f"v_proj{moe}", nn.Linear(e, hkv * d))
      setattr(self, f"o_proj{moe}", nn.Linear(hq * d, e, bias=False))
      if c.get("qk_norm", True):  # BAGEL's loaders force q/k norms on; a release JSON may omit them
        setattr(self, f"q_norm{moe}", RMSNorm(d, c["rms_norm_eps"]))
        setattr(self, f"k_norm{moe}", RMSNorm(d, c["rms_norm_eps"]))
    self.qk_norm = bool(c.get("qk_norm", True))

  def qkv(self, x, moe: str, cos, sin):
    b, l, _ = x.shape
    q = getattr(self, f"q_proj{moe}")(x).view(b, l, self.hq, self.d)
    k = getattr(self, f"k_proj{moe}")(x).view(b, l, self.hkv, self.d)
    v = getattr(self, f"v_proj{moe}")(x).view(b, l, self.hkv, self.d)
    if self.qk_norm:
      q, k = getattr(self, f"q_norm{moe}")(q), getattr(self, f"k_norm{moe}")(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MoTLayer(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    e, eps = c["hidden_size"], c["rms_norm_eps"]
    self.self_attn = MoTAttention(c)
    self.mlp = MLP(e, c["intermediate_size"])
    self.mlp_moe_gen = MLP(e, c["intermediate_size"])
    for moe in ("", "_moe_gen"):
      setattr(self, f"input_layernorm{moe}", RMSNorm(e, eps))
      setattr(self, f"post_attention_layernorm{moe}", RMSNorm(e, eps))

  def forward(self, h_und, h_gen, rope_und, rope_gen, meta, query_chunk=None):
    lu = h_und.shape[1]
    a = self.self_attn
    q_u, k_u, v_u = a.qkv(self.input_layernorm(h_und), "", *rope_und)
    q_g, k_g, v_g = a.qkv(self.input_layernorm_moe_gen(h_gen), "_moe_gen", *rope_gen)
    out = meta_attention(torch.cat([q_u, q_g], 1), torch.cat([k_u, k_g], 1), torch.cat([v_u, v_g], 1), meta,
                         query_chunk)
    out = out.flatten(2)  # [B, L, Hq*D]
    h_und = h_und + a.o_proj(out[:, :lu])
    h_gen = h_gen + a.o_proj_moe_gen(out[:, lu:])
    h_und = h_und + self.mlp(self.post_attention_layernorm(h_und))
    h_gen = h_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h_gen))
    return h_und, h_gen


class _LanguageModelBody(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
    self.layers = nn.ModuleList(MoTLayer(c) for _ in range(c["num_hidden_layers"]))
    self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
    self.norm_moe_gen = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class LanguageModel(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    self.model = _LanguageModelBody(c)
    self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)


class SiglipAttention(nn.Module):
  def __init__(self, e: int, heads: int):
    super().__init__()
    self.heads = heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(e, e) for _ in range(4))

  def forward(self, x, mask):
    b, l, e = x.shape
    split = lambda t: t.view(b, l, self.heads, e // self.heads)
    out = masked_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
    return self.out_proj(out.flatten(2))


class GeluMLP(nn.Module):
  """``fc2(gelu_tanh(fc1(x)))``: SigLIP's MLP (``e -> mlp -> e``) and the ViT-to-LLM connector
  (``vit_hidden -> hidden -> hidden``)."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    e, eps = c["hidden_size"], c["layer_norm_eps"]
    self.layer_norm1 = nn.LayerNorm(e, eps=eps)
    self.self_attn = SiglipAttention(e, c["num_attention_heads"])
    self.layer_norm2 = nn.LayerNorm(e, eps=eps)
    self.mlp = GeluMLP(e, c["intermediate_size"], e)

  def forward(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class _SiglipEmbeddings(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    p = c["patch_size"]
    self.patch_embedding = nn.Linear(p * p * c.get("num_channels", 3), c["hidden_size"])  # BAGEL: conv as Linear
    self.position_embedding = nn.Embedding((c["image_size"] // p) ** 2, c["hidden_size"])


class _SiglipEncoder(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    # BAGEL's convention: vit_config.json names one layer more than the checkpoint keeps
    self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c["num_hidden_layers"] - 1))


class SiglipVisionTransformer(nn.Module):
  """NaViT-packed SigLIP: ``[B, Nv, p*p*3]`` patches, each image attends only to itself."""

  def __init__(self, c: Mapping):
    super().__init__()
    self.embeddings = _SiglipEmbeddings(c)
    self.encoder = _SiglipEncoder(c)
    self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

  def forward(self, patches, pos_ids, image_ids):
    x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(pos_ids)
    valid = image_ids >= 0
    kinds = torch.where(valid, KIND_VIT, KIND_PAD)
    orders = torch.arange(image_ids.shape[1], device=image_ids.device).expand_as(image_ids)
    mask = visibility(image_ids, image_ids, kinds, orders)
    for layer in self.encoder.layers:
      x = layer(x, mask)
    return self.post_layernorm(x)


class _VitModel(nn.Module):
  def __init__(self, c: Mapping):
    super().__init__()
    self.vision_model = SiglipVisionTransformer(c)


class _PosEmbed(nn.Module):
  def __init__(self, n: int, hidden: int):
    super().__init__()
    self.pos_embed = nn.Parameter(torch.zeros(n, hidden), requires_grad=False)


class _TimestepEmbedder(nn.Module):
  def __init__(self, hidden: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  def forward(self, t):
    return self.mlp(timestep_sinusoid(t).to(self.mlp[0].weight.dtype))


class UniMAGETorch(nn.Module):
  """The MoT director for serving: ``forward(batch) -> (text logits [B, Lu, V], velocity [B, Lg, Dl])``.

  Set ``attention_chunk`` to build the attention mask per block of queries for long rows.
  """

  def __init__(self, llm_config: Mapping, vae_config: Mapping, vit_config: Mapping | None = None):
    super().__init__()
    self.attention_chunk: int | None = None  # queries per mask block; None: one dense [L, L] mask
    c = dict(llm_config)
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    self.llm_config, self.vae_config = c, dict(vae_config)
    e = c["hidden_size"]
    latent_dim = vae_config["latent_channels"] * vae_config["latent_patch_size"] ** 2
    self.language_model = LanguageModel(c)
    self.vae2llm = nn.Linear(latent_dim, e)
    self.llm2vae = nn.Linear(e, latent_dim)
    self.time_embedder = _TimestepEmbedder(e)
    self.latent_pos_embed = _PosEmbed(vae_config["max_latent_size"] ** 2, e)
    self.vit_model = self.connector = self.vit_pos_embed = None
    if vit_config is not None:
      self.vit_model = _VitModel(vit_config)
      self.connector = GeluMLP(vit_config["hidden_size"], e, e)
      self.vit_pos_embed = _PosEmbed(vae_config["vit_max_num_patch_per_side"] ** 2, e)

  def embed_und(self, batch) -> torch.Tensor:
    h = self.language_model.model.embed_tokens(batch["und_token_ids"].long())  # [B, Lu, E]
    patches = batch.get("vit_patches")
    if self.vit_model is not None and patches is not None and patches.shape[1] > 0:
      pos = batch["vit_pos_ids"].long()
      feats = self.vit_model.vision_model(patches.to(h.dtype), pos, batch["vit_image_ids"])
      tok = self.connector(feats) + self.vit_pos_embed.pos_embed[pos]  # [B, Nv, E]
      dest = batch["vit_dest"].long()
      valid = dest < h.shape[1]  # out-of-range destinations are padding, dropped as in JAX
      b_idx = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(dest)
      h = h.index_put((b_idx[valid], dest[valid]), tok[valid].to(h.dtype))
    return h

  def embed_gen(self, latents, timesteps, latent_pos) -> torch.Tensor:
    dtype = self.vae2llm.weight.dtype
    h = self.vae2llm(latents.to(dtype)) + self.time_embedder(timesteps)
    return h + self.latent_pos_embed.pos_embed[latent_pos.long()]

  def forward(self, batch: Mapping[str, torch.Tensor], noisy_latents: torch.Tensor | None = None,
              timesteps: torch.Tensor | None = None):
    """``noisy_latents [B, Lg, Dl]`` default to ``batch['gen_latents']``, ``timesteps [B, Lg]`` to 0."""
    c = self.llm_config
    latents = batch["gen_latents"] if noisy_latents is None else noisy_latents
    if timesteps is None:
      timesteps = torch.zeros(latents.shape[:2], device=latents.device)
    h_und = self.embed_und(batch)
    h_gen = self.embed_gen(latents, timesteps, batch["gen_latent_pos"])
    rope_und = rope(batch["und_positions"], c["head_dim"], c["rope_theta"])
    rope_gen = rope(batch["gen_positions"], c["head_dim"], c["rope_theta"])
    cat = lambda name: torch.cat([batch[f"und_{name}"], batch[f"gen_{name}"]], 1)
    meta = tuple(cat(n) for n in ("sample_ids", "segment_ids", "segment_kinds", "orders"))  # [B, L] each
    body = self.language_model.model
    for layer in body.layers:
      h_und, h_gen = layer(h_und, h_gen, rope_und, rope_gen, meta, self.attention_chunk)
    logits = self.language_model.lm_head(body.norm(h_und)).float()
    velocity = self.llm2vae(body.norm_moe_gen(h_gen)).float()
    if self.vae_config.get("flow_prediction", "velocity") == "x0":  # the head is the clean latent
      velocity = (latents.float() - velocity) / timesteps.float().clamp(min=X0_MIN_T)[..., None]
    return logits, velocity


def _read_json(directory: str, name: str):
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def weight_files(directory: str) -> list[str]:
  """The model's safetensors in an export or BAGEL release folder: ``ema.safetensors`` (BAGEL's one
  file), else the shards of ``model.safetensors.index.json``, else every ``*.safetensors`` but the
  VAE's ``ae.safetensors`` (same rule as ``unimage_jax.interchange.safetensors_io``)."""
  if os.path.exists(os.path.join(directory, "ema.safetensors")):
    return ["ema.safetensors"]
  index = _read_json(directory, "model.safetensors.index.json")
  if index:
    return sorted(set(index["weight_map"].values()))
  return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors") and f != "ae.safetensors")


def load_exported(directory: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> UniMAGETorch:
  """Builds the module from ``llm_config.json``/``vit_config.json``/``vae_config.json`` and loads the
  safetensors shards strictly (every key present, none extra, shapes equal)."""
  from safetensors.torch import load_file

  llm, vae, vit = (_read_json(directory, n) for n in ("llm_config.json", "vae_config.json", "vit_config.json"))
  if llm is None or vae is None:
    raise FileNotFoundError(f"{directory} needs llm_config.json and vae_config.json (tools/export_torch.py writes them)")
  with torch.device("meta"):
    model = UniMAGETorch(llm, vae, vit if vae.get("vit_enabled", vit is not None) else None)
  files = weight_files(directory)
  state = {}
  for f in files:
    state.update(load_file(os.path.join(directory, f), device=str(device)))
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  model.load_state_dict(state, strict=True, assign=True)
  return model.eval()
