"""AdamW with warmup + schedule, global-norm clipping, parameter-group masks and EMA.

Parameter groups are named by the top of their path, so a stage's config can freeze, e.g., the
ViT (``optim.frozen_groups = ['vit']``) or train only the generation expert in a keyframe stage
(``optim.frozen_groups = ['vit', 'und_expert', 'embeddings', 'lm_head']``) without code edits.
Frozen groups get ``optax.set_to_zero`` (no optimizer state, no update).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def group_of(path: tuple[str, ...]) -> str:
  """Parameter group of a pure-dict path such as ``('decoder', 'layers', 'gen', 'mlp', ...)``."""
  top = path[0]
  if top == "decoder":
    if path[1] == "layers":
      return "und_expert" if path[2] == "und" else "gen_expert"
    return "gen_expert" if path[1] == "norm_moe_gen" else "und_expert"
  return {
      "embed_tokens": "embeddings",
      "lm_head": "lm_head",
      "vae2llm": "latent_io",
      "llm2vae": "latent_io",
      "time_embedder": "latent_io",
      "connector": "connector",
      "vit_model": "vit",
  }[top]


def group_labels(params) -> Any:
  """A tree like ``params`` whose leaves are group names."""
  return jax.tree_util.tree_map_with_path(lambda p, _: group_of(tuple(k.key for k in p)), params)


def learning_rate_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  decay_steps = max(total_steps - o.warmup_steps, 1)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.learning_rate, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.learning_rate, o.learning_rate * o.min_lr_ratio, decay_steps)
  else:
    after = optax.constant_schedule(o.learning_rate)
  return optax.join_schedules([warmup, after], [o.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps) after global-norm clipping, on trainable groups only."""
  o = config.optim
  schedule = learning_rate_schedule(o, config.train.steps)
  # weight decay on matrices only (not norms, biases)
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
  )
  labels = jax.tree.map(lambda g: "frozen" if g in o.frozen_groups else "train", group_labels(params))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def update_ema(ema, params, decay: float):
  """``ema <- decay * ema + (1 - decay) * params`` in fp32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)
