"""Jitted inference primitives over the KV cache: prefill, text generation, image velocity.

All shapes are static (cache capacity, chunk sizes, ``max_new_tokens``), so each primitive
compiles once per shape and per-token decode cost does not depend on how much context is filled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unimage_jax import layout
from unimage_jax.inference import chunks, flow, kv_cache
from unimage_jax.inference.kv_cache import KVCache
from unimage_jax.model.functional import ModelDef
from unimage_jax.model.unimage import latent_token_dim


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off


def sample_token(rng, logits, params: SamplingParams):
  """logits [B, V] -> token ids [B] with temperature, top-k and nucleus (top-p) filtering."""
  if params.temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / params.temperature
  if params.top_k > 0:
    kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep = cum - probs < params.top_p  # always keeps the top token
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


class Engine:
  """Binds a model definition and weights; exposes cache-level operations."""

  def __init__(self, mdef: ModelDef, params, tables, model_cfg):
    self.mdef, self.params, self.tables, self.cfg = mdef, params, tables, model_cfg
    self.latent_dim = latent_token_dim(model_cfg)
    self.vit_patch_dim = model_cfg.vit.patch_size**2 * 3
    self._extend = jax.jit(self._extend_impl, static_argnames=("write",))
    self._generate = jax.jit(self._generate_impl, static_argnames=("max_new", "sampling"))
    self._sample_image = jax.jit(self._sample_image_impl, static_argnames=("num_steps", "shift", "guidance"))

  def new_cache(self, batch: int, capacity: int) -> KVCache:
    return kv_cache.empty_cache(self.cfg, batch, capacity, jnp.dtype(self.cfg.compute_dtype))

  # ------------------------------------------------------------------ chunks against the cache
  def _extend_impl(self, params, tables, cache: KVCache, chunk, latents, timesteps, write: bool):
    model = self.mdef.bind(params, tables)
    hidden, velocity, new_k, new_v = model.extend(chunk, latents, timesteps, cache.k, cache.v, cache.meta)
    real = chunk["und_segment_kinds"] != layout.KIND_PAD
    last = jnp.max(jnp.where(real, jnp.arange(real.shape[1]), 0), axis=1)  # [B] last real und slot
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])  # [B, V]
    if write:
      cache = kv_cache.append(cache, new_k, new_v, chunk)
    return cache, logits, velocity

  def prefill(self, cache: KVCache, segments_per_row) -> tuple[KVCache, jax.Array]:
    """Appends segments (text / clean images / ViT) to every row; returns logits after each row's last und token."""
    chunk = chunks.chunk_from_segments(segments_per_row, cache, self.cfg)
    kv_cache.check_room(cache, chunk["und_token_ids"].shape[1] + chunk["gen_latents"].shape[1])
    cache, logits, _ = self._extend(self.params, self.tables, cache, chunk, chunk["gen_latents"],
                                    jnp.zeros(chunk["gen_latent_pos"].shape, jnp.float32), write=True)
    return cache, logits

  def velocity(self, cache: KVCache, image_chunk, x_t, t):
    """Velocity of a noised image chunk against the cache (not written: a denoising step)."""
    timesteps = jnp.where(image_chunk["gen_segment_kinds"] == layout.KIND_NOISE, t, 0.0).astype(jnp.float32)
    _, _, velocity = self._extend(self.params, self.tables, cache, image_chunk, x_t, timesteps, write=False)
    return velocity

  # ------------------------------------------------------------------ text generation
  def _generate_impl(self, params, tables, cache: KVCache, logits, rng, stop_ids, banned, max_new: int,
                     sampling: SamplingParams):
    b = logits.shape[0]

    def cond(state):
      i, _, _, _, done, _ = state
      return (i < max_new) & ~jnp.all(done)

    def body(state):
      i, cache, logits, tokens, done, rng = state
      rng, key = jax.random.split(rng)
      logits = jnp.where(banned, -jnp.inf, logits)  # [B, V]; banned [V]: tokens the caller forbids
      token = sample_token(key, logits, sampling).astype(jnp.int32)
      live = ~done
      tokens = tokens.at[:, i].set(jnp.where(live, token, -1))
      chunk = chunks.text_token_chunk(token, cache, layout.KIND_TEXT, live, self.vit_patch_dim, self.latent_dim)
      cache, logits, _ = self._extend_impl(params, tables, cache, chunk, chunk["gen_latents"],
                                           jnp.zeros((b, 0), jnp.float32), write=True)
      done = done | jnp.isin(token, stop_ids)
      return i + 1, cache, logits, tokens, done, rng

    tokens = jnp.full((b, max_new), -1, jnp.int32)
    init = (jnp.zeros((), jnp.int32), cache, logits, tokens, jnp.zeros((b,), bool), rng)
    _, cache, logits, tokens, _, _ = jax.lax.while_loop(cond, body, init)
    return cache, tokens, logits

  def generate(self, cache: KVCache, logits, rng, *, max_new: int, stop_ids, sampling=SamplingParams(),
               banned=None):
    """Samples up to ``max_new`` tokens per row (stopping at ``stop_ids``); returns (cache, tokens [B, max_new]).

    ``banned`` (bool ``[vocab]``, optional) marks tokens that are never sampled (schema
    constraints); it is an array argument, so changing it does not recompile. Generated tokens
    are in the cache; ``-1`` marks slots after a row stopped.
    """
    kv_cache.check_room(cache, max_new)
    banned = jnp.zeros(logits.shape[-1], bool) if banned is None else jnp.asarray(banned, bool)
    cache, tokens, _ = self._generate(self.params, self.tables, cache, logits, rng,
                                      jnp.asarray(stop_ids, jnp.int32), banned, max_new=max_new, sampling=sampling)
    return cache, tokens

  # ------------------------------------------------------------------ image generation
  def _sample_image_impl(self, params, tables, cache: KVCache, image_chunk, rng, num_steps: int, shift: float,
                         guidance: flow.GuidanceParams):
    rows = cache.length.shape[0]
    noise_mask = (image_chunk["gen_segment_kinds"][:1] == layout.KIND_NOISE)[..., None]  # [1, Lg, 1]
    x_init = jax.random.normal(rng, image_chunk["gen_latents"][:1].shape, jnp.float32)

    def velocity_fn(x, t):
      xb = jnp.broadcast_to(x, (rows, *x.shape[1:]))
      timesteps = jnp.where(image_chunk["gen_segment_kinds"] == layout.KIND_NOISE, t, 0.0)
      _, _, v = self._extend_impl(params, tables, cache, image_chunk, xb, timesteps, write=False)
      if rows == 1:
        out = v
      else:
        out = flow.guided_velocity(v[0], v[1], v[2], t, guidance)[None]
      return jnp.where(noise_mask, out, 0.0)

    return flow.euler_sample(velocity_fn, x_init, num_steps, shift)[0]  # [Lg, Dl]

  def sample_image(self, cache: KVCache, image_chunk, rng, *, num_steps: int, shift: float,
                   guidance: flow.GuidanceParams = flow.GuidanceParams()):
    """Euler rectified-flow sampling of one image against each row's context.

    ``cache`` has 1 row (no guidance) or 3 rows: [full context, without text, without images];
    ``image_chunk`` is the noised image segment laid out for those rows. Only the image tokens
    are recomputed at each step; the context stays in the cache. Returns latents ``[Lg, Dl]``.
    """
    if cache.length.shape[0] not in (1, 3):
      raise ValueError(f"sample_image needs 1 or 3 cache rows, got {cache.length.shape[0]}")
    if num_steps < 2:
      raise ValueError(f"num_steps={num_steps} must be >= 2 (N timesteps make N - 1 Euler steps)")
    return self._sample_image(self.params, self.tables, cache, image_chunk, rng, num_steps=num_steps,
                              shift=float(shift), guidance=guidance)
