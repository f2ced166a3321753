"""UniMAGE: the whole director network (embeddings, ViT path, latent path, MoT decoder, heads).

One module, BAGEL's parameter semantics (docs/ARCHITECTURE.md §3 and §10), used functionally under
jit via ``nnx.split`` / ``nnx.merge``. Inputs follow the packed-row contract of
``unimage_jax.layout``; the latent tokens are given already noised (the loss owns the noise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unimage_jax.config_validation import flow_prediction
from unimage_jax.layout import TokenMeta
from unimage_jax.model import constraints, layers, row_shards
from unimage_jax.model.mot import MoTDecoder
from unimage_jax.model.positional import rope_tables, sincos_2d_table, timestep_sinusoid
from unimage_jax.model.vit import SiglipVisionEncoder


class FixedTable(nnx.Variable):
  """A non-trainable table (the 2D sin-cos position embeddings); exported, never optimised."""


class TimestepEmbedder(nnx.Module):
  """256-dim sinusoid of the shifted timestep -> Linear, SiLU, Linear (keys ``mlp.0``/``mlp.2``).

  Initialisation (from scratch only; imported weights replace it). BAGEL feeds ``t`` in [0, 1] to
  a sinusoid made for t in [0, 1000]: over that range only ~40 of the 256 features move, and their
  constant part is 14x larger than their variation. With the usual N(0, 0.02) weights the embedding
  is then one constant vector (output RMS 0.03, t-variation 0.003, correlation 0.97 between t=0 and
  t=1), far below the latent position table (RMS 0.7): a small model starts blind to the noise
  level and cannot learn the 1/t gain that removes the last noise (see README, "Diagnosing the
  keyframes"). So ``mlp.0`` is initialised on *standardised* features: each moving feature is
  centred and scaled by its spread over t in [0, 1] (weights N(0, 1 / (n std_k^2)), bias removing
  the mean), constant features start at 0; ``mlp.2`` is LeCun-normal. The embedding starts with
  RMS ~0.6 and a t-variation of the same size.
  """

  FREQ_DIM = 256

  def __init__(self, hidden: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, param_dtype=dtype, rngs=rngs)
    self.mlp_0 = layers.Dense([self.FREQ_DIM], [hidden], ["timestep"], ["embed"], **kw)
    self.mlp_2 = layers.Dense([hidden], [hidden], ["embed"], ["embed"], **kw,
                              kernel_init=jax.nn.initializers.lecun_normal())
    feats = timestep_sinusoid(jnp.linspace(0.0, 1.0, 257), self.FREQ_DIM)  # [257, 256]
    mean, std = jnp.mean(feats, axis=0), jnp.std(feats, axis=0)  # [256]
    moving = std > 1e-2
    scale = jnp.where(moving, 1.0 / (jnp.maximum(std, 1e-2) * jnp.sqrt(jnp.sum(moving))), 0.0)
    kernel = jax.random.normal(rngs.params(), (self.FREQ_DIM, hidden), jnp.float32) * scale[:, None]
    self.mlp_0.kernel.value = kernel.astype(dtype)
    self.mlp_0.bias.value = (-(mean @ kernel)).astype(dtype)

  def __call__(self, t: jax.Array, dtype) -> jax.Array:
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_sinusoid(t, self.FREQ_DIM), dtype)), dtype)


class Connector(nnx.Module):
  """ViT features -> LLM width: ``fc2(gelu_tanh(fc1(x)))``."""

  def __init__(self, vit_hidden: int, hidden: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, param_dtype=dtype, rngs=rngs)
    self.fc1 = layers.Dense([vit_hidden], [hidden], ["vit_embed"], ["embed"], **kw)
    self.fc2 = layers.Dense([hidden], [hidden], ["embed"], ["embed"], **kw)

  def __call__(self, x, dtype):
    return self.fc2(jax.nn.gelu(self.fc1(x, dtype), approximate=True), dtype)


def latent_token_dim(cfg: ml_collections.ConfigDict) -> int:
  return cfg.latent_channels * cfg.latent_patch_size**2


X0_MIN_T = 0.05  # x0-prediction: t below this divides by it (JiT's clip), the velocity stays bounded


def flow_velocity(head: jax.Array, noisy_latents: jax.Array, timesteps: jax.Array, prediction: str) -> jax.Array:
  """The velocity ``eps - x0`` from the head's output ``[B, Lg, Dl]``.

  "velocity": the head is the velocity (BAGEL). "x0": the head is the clean latent, and with
  ``x_t = (1 - t) x0 + t eps`` the velocity is ``(x_t - x0) / t``. Predicting the clean image is
  what a narrow network can do on high-dimensional pixel tokens (Li & He, "Back to Basics: Let
  Denoising Generative Models Denoise", 2025): the clean keyframe lies on a low-dimensional
  manifold, the noise in a velocity target does not. The tiny configs' 192-dim pixel tokens on a
  256-wide model are that case (README, "Diagnosing the keyframes").
  """
  if prediction == "velocity":
    return head
  t = jnp.maximum(timesteps, X0_MIN_T)[..., None]  # [B, Lg, 1]
  return (noisy_latents.astype(jnp.float32) - head) / t


class UniMAGE(nnx.Module):
  """The MoT director. ``cfg`` is the ``model`` sub-config."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.param_dtype)
    e, dl = cfg.hidden_size, latent_token_dim(cfg)
    self.embed_tokens = layers.make_param(rngs, layers.normal_init, [cfg.vocab_size, e], ["vocab", "embed"], dtype)
    self.decoder = MoTDecoder(cfg, rngs)
    self.lm_head = layers.Dense([e], [cfg.vocab_size], ["embed"], ["vocab"], use_bias=False,
                                param_dtype=dtype, rngs=rngs)
    # LeCun-normal: the noisy latent enters at the scale of the position table (N(0, 0.02) would
    # make it a 1/4-size signal under the first RMSNorm)
    self.vae2llm = layers.Dense([dl], [e], ["latent"], ["embed"], use_bias=True, param_dtype=dtype, rngs=rngs,
                                kernel_init=jax.nn.initializers.lecun_normal())
    self.llm2vae = layers.Dense([e], [dl], ["embed"], ["latent"], use_bias=True, param_dtype=dtype,
                                rngs=rngs, kernel_init=layers.zeros_init)
    self.time_embedder = TimestepEmbedder(e, dtype, rngs)
    self.latent_pos_embed = FixedTable(jnp.asarray(sincos_2d_table(e, cfg.max_latent_grid), dtype),
                                       logical_axes=(None, "embed"))
    if cfg.vit.enabled:
      self.vit_model = SiglipVisionEncoder(cfg.vit, cfg.param_dtype, cfg.scan_layers, rngs)
      self.connector = Connector(cfg.vit.hidden_size, e, dtype, rngs)
      self.vit_pos_embed = FixedTable(
          jnp.asarray(sincos_2d_table(e, cfg.vit.max_patches_per_side), dtype), logical_axes=(None, "embed"))
    else:
      self.vit_model = self.connector = self.vit_pos_embed = None

  # ------------------------------------------------------------------ embeddings
  def embed_und(self, batch) -> jax.Array:
    """Text tokens, with ViT tokens scattered into their und slots: ``[B, Lu, E]``."""
    dtype = jnp.dtype(self.cfg.compute_dtype)
    h = jnp.take(self.embed_tokens[...], batch["und_token_ids"], axis=0).astype(dtype)
    if self.vit_model is not None and batch["vit_patches"].shape[1] > 0:
      feats = self.vit_model(batch["vit_patches"], batch["vit_pos_ids"], batch["vit_image_ids"], dtype,
                             self.cfg.remat_policy)
      vit_tok = self.connector(feats, dtype)
      vit_tok = vit_tok + jnp.take(self.vit_pos_embed[...], batch["vit_pos_ids"], axis=0).astype(dtype)
      h = jax.vmap(lambda row, dest, tok: row.at[dest].set(tok, mode="drop"))(h, batch["vit_dest"], vit_tok)
    return h

  def embed_gen(self, latents: jax.Array, timesteps: jax.Array, latent_pos: jax.Array) -> jax.Array:
    """``vae2llm(x_t) + time_embed(t) + latent_pos_embed[pos]``: ``[B, Lg, E]``."""
    dtype = jnp.dtype(self.cfg.compute_dtype)
    h = self.vae2llm(latents, dtype) + self.time_embedder(timesteps, dtype)
    return h + jnp.take(self.latent_pos_embed[...], latent_pos, axis=0).astype(dtype)

  # ------------------------------------------------------------------ forward
  def _inputs(self, batch, noisy_latents, timesteps):
    """Embeddings, RoPE tables and concatenated visibility metadata of a row (or a chunk)."""
    cfg = self.cfg
    h_und = constraints.constrain(self.embed_und(batch), constraints.HIDDEN)  # [B, Lu, E]
    h_gen = constraints.constrain(self.embed_gen(noisy_latents, timesteps, batch["gen_latent_pos"]),
                                  constraints.HIDDEN)  # [B, Lg, E]
    rope_und = rope_tables(batch["und_positions"], cfg.head_dim, cfg.rope_theta)
    rope_gen = rope_tables(batch["gen_positions"], cfg.head_dim, cfg.rope_theta)
    return h_und, h_gen, rope_und, rope_gen, row_shards.joint_meta(batch)  # meta fields [B, Lu+Lg]

  def velocity(self, h_gen: jax.Array, noisy_latents: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Final gen hidden states -> latent velocity ``[B, Lg, Dl]`` (fp32).

    ``flow_prediction="x0"`` reads the head as the clean latent and returns the velocity it
    implies, ``(x_t - x0) / t`` (see ``flow_velocity``); everything downstream (loss, sampler,
    guidance) stays in velocity space.
    """
    out = self.llm2vae(h_gen, jnp.dtype(self.cfg.compute_dtype)).astype(jnp.float32)
    return flow_velocity(out, noisy_latents, timesteps, flow_prediction(self.cfg))

  def __call__(self, batch, noisy_latents: jax.Array, timesteps: jax.Array):
    """Packed row -> (und hidden ``[B, Lu, E]`` after the final norm, velocity ``[B, Lg, Dl]``).

    ``noisy_latents [B, Lg, Dl]`` replace ``batch['gen_latents']`` (clean tokens pass unchanged);
    ``timesteps [B, Lg]`` are the shifted t of each latent token (0 for clean tokens).
    """
    h_und, h_gen = self.decoder(*self._inputs(batch, noisy_latents, timesteps))
    return h_und, self.velocity(h_gen, noisy_latents, timesteps)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """``[..., E] -> [..., V]`` in fp32 (untied lm_head)."""
    return self.lm_head(hidden, jnp.dtype(self.cfg.compute_dtype)).astype(jnp.float32)

  def extend(self, chunk, noisy_latents: jax.Array, timesteps: jax.Array, cache_k, cache_v, cache_meta: TokenMeta):
    """New tokens (a chunk in the layout of a packed row) against a KV cache.

    Returns (und hidden ``[B, Lu', E]``, velocity ``[B, Lg', Dl]``, new k, new v
    ``[layers, B, Lu'+Lg', Hkv, D]``). Used by the director for prefill, decoding and denoising.
    """
    h_und, h_gen, new_k, new_v = self.decoder.extend(*self._inputs(chunk, noisy_latents, timesteps),
                                                     cache_k, cache_v, cache_meta)
    return h_und, self.velocity(h_gen, noisy_latents, timesteps), new_k, new_v
