"""Config checks that run before anything is traced or compiled.

Every problem is reported at once, each naming the config field (``config.model.num_heads``) and
the offending value, so a sweep with an impossible override fails in milliseconds, not after a
ten-minute TPU compile.
"""

from __future__ import annotations

import math

import ml_collections

from unimage_jax.choices import (ATTENTION_IMPLS, AUTOENCODERS, CONTEXT_PARALLEL, FLOAT_DTYPES, FLOW_PREDICTIONS,
                                 INFERENCE_MODES, KEYFRAME_CAPTIONS, PARAM_GROUPS, REMAT_POLICIES, RENORM_TYPES, SCHEDULES,
                                 XLA_ATTENTION_IMPLS)
from unimage_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """An invalid configuration; the message lists every offending field."""


def _model_errors(m: ml_collections.ConfigDict) -> list[str]:
  errors = []
  positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "latent_channels", "latent_patch_size", "max_latent_grid", "ce_chunk",
              "attention_query_chunk")
  for name in positive:
    if int(m[name]) <= 0:
      errors.append(f"config.model.{name}={m[name]} must be positive")
  if errors:
    return errors
  if m.num_heads % m.num_kv_heads:
    errors.append(f"config.model.num_heads={m.num_heads} must be divisible by "
                  f"config.model.num_kv_heads={m.num_kv_heads} (grouped-query attention)")
  if m.hidden_size % m.num_heads:
    errors.append(f"config.model.hidden_size={m.hidden_size} must be divisible by "
                  f"config.model.num_heads={m.num_heads}")
  if m.head_dim % 2:
    errors.append(f"config.model.head_dim={m.head_dim} must be even (rotate-half RoPE)")
  if m.hidden_size % 4:
    errors.append(f"config.model.hidden_size={m.hidden_size} must be divisible by 4 (2D sin-cos embeddings)")
  for name in ("param_dtype", "compute_dtype"):
    if m[name] not in FLOAT_DTYPES:
      errors.append(f"config.model.{name}={m[name]!r} must be one of {FLOAT_DTYPES}")
  if m.remat_policy not in REMAT_POLICIES:
    errors.append(f"config.model.remat_policy={m.remat_policy!r} must be one of {REMAT_POLICIES}")
  if m.attention_impl not in ATTENTION_IMPLS:
    errors.append(f"config.model.attention_impl={m.attention_impl!r} must be one of {ATTENTION_IMPLS}")
  cp = context_parallel(m)
  if cp not in CONTEXT_PARALLEL:
    errors.append(f"config.model.context_parallel={cp!r} must be 'all_gather' or 'ring'")
  elif cp == "ring" and m.attention_impl not in XLA_ATTENTION_IMPLS:
    errors.append(f"config.model.context_parallel='ring' runs the XLA flash tiles: set config.model.attention_impl "
                  f"to 'xla_flash' (now {m.attention_impl!r}) or use 'all_gather'")
  if m.autoencoder not in AUTOENCODERS:
    errors.append(f"config.model.autoencoder={m.autoencoder!r} must be one of {AUTOENCODERS}")
  elif m.autoencoder == "pixel" and m.latent_channels != 3 * m.pixel_downsample**2:
    errors.append(f"config.model.latent_channels={m.latent_channels} must equal 3 * pixel_downsample**2 = "
                  f"{3 * m.pixel_downsample**2} for the pixel autoencoder")
  if m.rms_norm_eps <= 0:
    errors.append(f"config.model.rms_norm_eps={m.rms_norm_eps} must be positive")
  if m.timestep_shift <= 0:
    errors.append(f"config.model.timestep_shift={m.timestep_shift} must be positive")
  if flow_prediction(m) not in FLOW_PREDICTIONS:
    errors.append(f"config.model.flow_prediction={flow_prediction(m)!r} must be one of {FLOW_PREDICTIONS}")
  if m.flow_loss not in ("auto",) + FLOW_PREDICTIONS:
    errors.append(f"config.model.flow_loss={m.flow_loss!r} must be one of {('auto',) + FLOW_PREDICTIONS}")
  v = m.vit
  if v.enabled:
    for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size", "max_patches_per_side"):
      if int(v[name]) <= 0:
        errors.append(f"config.model.vit.{name}={v[name]} must be positive")
    if v.num_heads > 0 and v.hidden_size % v.num_heads:
      errors.append(f"config.model.vit.hidden_size={v.hidden_size} must be divisible by "
                    f"config.model.vit.num_heads={v.num_heads}")
  return errors


def _data_errors(c: ml_collections.ConfigDict) -> list[str]:
  d, m = c.data, c.model
  errors = []
  for name in ("und_len", "batch_size", "max_segments", "image_size"):
    if int(d[name]) <= 0:
      errors.append(f"config.data.{name}={d[name]} must be positive")
  if "noised_copies" in d and int(d.noised_copies) < 1:
    errors.append(f"config.data.noised_copies={d.noised_copies} must be >= 1")
  for name in ("gen_len", "vit_len"):
    if int(d[name]) < 0:
      errors.append(f"config.data.{name}={d[name]} must be >= 0")
  if d.vit_len > d.und_len:
    errors.append(f"config.data.vit_len={d.vit_len} cannot exceed config.data.und_len={d.und_len} "
                  "(ViT tokens occupy und-buffer slots)")
  if d.vit_len > 0 and not m.vit.enabled:
    errors.append(f"config.data.vit_len={d.vit_len} needs config.model.vit.enabled=True")
  if m.autoencoder in AUTOENCODERS and d.image_size > 0:
    stride = latent_downsample(m) * m.latent_patch_size
    if d.image_size % stride:
      down = "pixel_downsample" if m.autoencoder == "pixel" else "vae_downsample"
      errors.append(f"config.data.image_size={d.image_size} must be divisible by {down} * "
                    f"latent_patch_size = {stride}")
    elif d.image_size // stride > m.max_latent_grid:
      errors.append(f"config.data.image_size={d.image_size} gives a {d.image_size // stride}-patch latent "
                    f"side, larger than config.model.max_latent_grid={m.max_latent_grid}")
    elif (d.image_size // stride) ** 2 > d.gen_len:
      errors.append(f"config.data.gen_len={d.gen_len} cannot hold one {d.image_size}px image "
                    f"({(d.image_size // stride) ** 2} latent tokens)")
  weights = {k: float(v) for k, v in d.tasks.items()}
  if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    errors.append(f"config.data.tasks={weights} must be non-negative with a positive sum")
  caption = d.get("keyframe_caption", "none")
  if caption not in KEYFRAME_CAPTIONS:
    errors.append(f"config.data.keyframe_caption={caption!r} must be one of {KEYFRAME_CAPTIONS}")
  for name in ("precontext_split_prob", "text_cond_dropout", "vit_cond_dropout", "vae_cond_dropout"):
    if not 0.0 <= float(d[name]) <= 1.0:
      errors.append(f"config.data.{name}={d[name]} must be a probability in [0, 1]")
  return errors


def _optim_errors(c: ml_collections.ConfigDict) -> list[str]:
  o, t, lo = c.optim, c.train, c.loss
  errors = []
  if o.learning_rate <= 0:
    errors.append(f"config.optim.learning_rate={o.learning_rate} must be positive")
  if o.schedule not in SCHEDULES:
    errors.append(f"config.optim.schedule={o.schedule!r} must be one of {SCHEDULES}")
  for name in ("b1", "b2", "ema_decay"):
    if not 0.0 <= float(o[name]) < 1.0:
      errors.append(f"config.optim.{name}={o[name]} must be in [0, 1)")
  if o.warmup_steps < 0:
    errors.append(f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
  unknown = sorted(set(o.frozen_groups) - set(PARAM_GROUPS))
  if unknown:
    errors.append(f"config.optim.frozen_groups has unknown groups {unknown}; known: {PARAM_GROUPS}")
  for loss_name, groups in o.loss_groups.items():
    if loss_name not in ("ce", "mse"):
      errors.append(f"config.optim.loss_groups has unknown loss {loss_name!r}; use 'ce' and 'mse'")
    bad = sorted(set(groups) - set(PARAM_GROUPS))
    if bad:
      errors.append(f"config.optim.loss_groups.{loss_name} has unknown groups {bad}; known: {PARAM_GROUPS}")
  if t.steps <= 0:
    errors.append(f"config.train.steps={t.steps} must be positive")
  if t.grad_accum_steps <= 0:
    errors.append(f"config.train.grad_accum_steps={t.grad_accum_steps} must be positive")
  elif c.data.batch_size % t.grad_accum_steps:
    errors.append(f"config.data.batch_size={c.data.batch_size} must be divisible by "
                  f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if t.nonfinite not in ("skip", "stop"):
    errors.append(f"config.train.nonfinite={t.nonfinite!r} must be 'skip' or 'stop'")
  errors += _pod_errors(c)
  if t.log_every < 1:
    errors.append(f"config.train.log_every={t.log_every} must be >= 1 (metrics every N steps)")
  if t.checkpoint_every < 0:
    errors.append(f"config.train.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = only the final save)")
  if t.keep_checkpoints < 1:
    errors.append(f"config.train.keep_checkpoints={t.keep_checkpoints} must be >= 1 (0 would keep no checkpoint)")
  if lo.ce_weight < 0 or lo.mse_weight < 0 or lo.ce_weight + lo.mse_weight == 0:
    errors.append(f"config.loss weights (ce_weight={lo.ce_weight}, mse_weight={lo.mse_weight}) must be "
                  "non-negative and not both zero")
  return errors


def _pod_errors(c: ml_collections.ConfigDict) -> list[str]:
  """Multi-slice mesh sizes, profiling window and data-resume policy (README "TPU pods")."""
  from unimage_jax.training.profiling import parse_steps
  errors = []
  for axis in ("dcn_data", "dcn_fsdp"):
    if int(c.mesh.get(axis, 1)) < 1:
      errors.append(f"config.mesh.{axis}={c.mesh[axis]} must be >= 1 (slices along {axis[4:]})")
  errors += _sequence_errors(c)
  try:
    parse_steps(c.train.get("profile_steps", ""))
  except ValueError as e:
    errors.append(str(e))
  if c.train.get("data_resume", "auto") not in ("auto", "restart"):
    errors.append(f"config.train.data_resume={c.train.data_resume!r} must be 'auto' or 'restart'")
  return errors


def _rule_targets(rules, name: str) -> tuple[str, ...]:
  for rule_name, target in rules:
    if rule_name == name:
      return () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return ()


def _sequence_errors(c: ml_collections.ConfigDict) -> list[str]:
  """Context parallelism (README "Context parallelism"): rows cut evenly, the rules split them."""
  from unimage_jax.slot_layout import SLOT_LAYOUTS
  seq = int(c.mesh.get("sequence", 1))
  if seq == 0 or seq < -1:
    return [f"config.mesh.sequence={seq} must be positive or -1"]
  errors = []
  slots = slot_layout(c.data)
  if slots not in SLOT_LAYOUTS:
    errors.append(f"config.data.slot_layout={slots!r} must be one of {SLOT_LAYOUTS}")
  elif slots == "zigzag" and seq == -1:
    errors.append("config.data.slot_layout='zigzag' needs an explicit config.mesh.sequence (the packer "
                  "lays out the slots for it), not -1")
  elif slots == "zigzag" and seq > 1:
    for name in ("und_len", "gen_len"):
      if c.data[name] % (2 * seq):
        errors.append(f"config.data.{name}={c.data[name]} is not divisible by 2 * config.mesh.sequence = "
                      f"{2 * seq} (config.data.slot_layout='zigzag' cuts each buffer into 2 chunks per shard)")
    if not errors:
      errors += _zigzag_tile_errors(c, seq)
  if seq == 1:
    return errors
  rules = list(c.get("logical_axis_rules", []))
  if "sequence" not in _rule_targets(rules, "length"):
    errors.append(f"config.mesh.sequence={seq} but config.logical_axis_rules map 'length' to "
                  f"{_rule_targets(rules, 'length') or None}: rows would not be split; use ('length', 'sequence')")
  if "sequence" in _rule_targets(rules, "batch"):
    errors.append("config.logical_axis_rules: 'batch' must not use the 'sequence' axis (it splits rows, not batches)")
  if seq > 1:
    from unimage_jax.sharding import sequence_errors  # local: sharding imports this module
    errors += sequence_errors(c, seq)
  return errors


def attention_tile(m: ml_collections.ConfigDict) -> int | None:
  """Slots per side of the tiles whose block summaries decide what attention skips (None: the
  reference, which skips nothing). ``auto`` takes the largest kernel tile (the TPU's), a multiple
  of the others: validation does not know the backend (AOT plans for TPUs run on CPU hosts)."""
  from unimage_jax.attention.blocked_xla import DEFAULT_BLOCK  # local: jax only when zig-zag is on
  from unimage_jax.attention.dispatch import DEFAULT_BLOCKS
  tiles = {"xla_flash": DEFAULT_BLOCK, **{k: math.lcm(*v) for k, v in DEFAULT_BLOCKS.items()}}
  if context_parallel(m) == "ring":
    return DEFAULT_BLOCK  # the ring runs the XLA flash tiles for both XLA impls
  if m.attention_impl == "auto":
    return math.lcm(*tiles.values())
  return tiles.get(m.attention_impl)


def _zigzag_tile_errors(c: ml_collections.ConfigDict, seq: int) -> list[str]:
  """Zig-zag chunks (``buffer / (2 * sequence)``) must be whole attention tiles: a tile across two
  chunks mixes early and late tokens of the row, is no longer provably empty, and the skipped
  work comes back (README "Context parallelism": up to 3x the tiles). One-tile rows skip nothing."""
  d, m = c.data, c.model
  tile = attention_tile(m)
  if tile is None or d.und_len + d.gen_len <= tile:
    return []
  ring = context_parallel(m) == "ring"
  kernel = "config.model.context_parallel='ring'" if ring else f"config.model.attention_impl={m.attention_impl!r}"
  errors = []
  for name in ("und_len", "gen_len"):
    chunk = d[name] // (2 * seq)
    if chunk % tile:
      errors.append(f"config.data.{name}={d[name]} gives zig-zag chunks of {chunk} slots (config.data.{name} / "
                    f"(2 * config.mesh.sequence={seq})), not whole {tile}-slot attention tiles of {kernel}: "
                    f"make the chunk a multiple of {tile} or use config.data.slot_layout='contiguous'")
  return errors


def context_parallel(m: ml_collections.ConfigDict) -> str:
  """How rows split over the sequence axis attend (``CONTEXT_PARALLEL``); configs saved before the
  field all-gather."""
  return m.get("context_parallel", "all_gather")


def flow_prediction(m: ml_collections.ConfigDict) -> str:
  """What llm2vae predicts (``FLOW_PREDICTIONS``); configs saved before the field predict the velocity."""
  return m.get("flow_prediction", "velocity")


def slot_layout(d: ml_collections.ConfigDict) -> str:
  """How ``config.data`` orders a row's slots over the sequence shards (``unimage_jax/slot_layout.py``);
  configs saved before the field keep them contiguous."""
  return d.get("slot_layout", "contiguous")


def vae_downsample(m: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell of the VAE; configs saved before the field had FLUX's 8."""
  return m.get("vae_downsample", 8)


def latent_downsample(m: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell: the pixel codec's fold, or the VAE's (FLUX: 8)."""
  return m.pixel_downsample if m.autoencoder == "pixel" else vae_downsample(m)


def image_tokens(c: ml_collections.ConfigDict) -> int:
  """Cache slots one keyframe takes: its latent tokens plus the two vision markers."""
  m = c.model
  side = c.data.image_size // (latent_downsample(m) * m.latent_patch_size)
  return side * side + 2


def inference_errors(c: ml_collections.ConfigDict, prefix: str = "config.inference.") -> list[str]:
  """The director's sampling settings (``config.inference``); ``prefix`` names them as the user set
  them (``--set=`` for tools/direct.py)."""
  inf = c.inference
  errors = []
  name = lambda k: f"{prefix}{k}={inf[k]!r}" if isinstance(inf[k], str) else f"{prefix}{k}={inf[k]}"
  if inf.mode not in INFERENCE_MODES:
    errors.append(f"{name('mode')} must be one of {INFERENCE_MODES}")
  if float(inf.temperature) < 0:
    errors.append(f"{name('temperature')} must be >= 0 (0 = greedy)")
  if int(inf.top_k) < 0:
    errors.append(f"{name('top_k')} must be >= 0 (0 = off)")
  if not 0.0 < float(inf.top_p) <= 1.0:
    errors.append(f"{name('top_p')} must be in (0, 1] (1 = off)")
  for k in ("max_script_tokens", "max_chunk_tokens", "max_attempts"):
    if int(inf[k]) < 1:
      errors.append(f"{name(k)} must be >= 1")
  if int(inf.get("valid_attempts", 1)) < 1:
    errors.append(f"{name('valid_attempts')} must be >= 1 (1 = take the first repairable script)")
  if int(inf.num_steps) < 2:
    errors.append(f"{name('num_steps')} must be >= 2 (N timesteps make N - 1 Euler steps)")
  if float(inf.timestep_shift) <= 0:
    errors.append(f"{name('timestep_shift')} must be positive")
  for k in ("cfg_text_scale", "cfg_img_scale"):
    if float(inf[k]) < 0:
      errors.append(f"{name(k)} must be >= 0 (1 = no guidance)")
  interval = tuple(inf.cfg_interval)
  if len(interval) != 2 or not 0.0 <= float(interval[0]) <= float(interval[1]) <= 1.0:
    errors.append(f"{prefix}cfg_interval={interval} must be two numbers 0 <= start <= end <= 1")
  if inf.cfg_renorm_type not in RENORM_TYPES:
    errors.append(f"{name('cfg_renorm_type')} must be one of {RENORM_TYPES}")
  if not 0.0 <= float(inf.cfg_renorm_min) <= 1.0:
    errors.append(f"{name('cfg_renorm_min')} must be in [0, 1]")
  need = image_tokens(c) + 2 + 32  # one keyframe, a text segment's markers and a short prompt
  if int(inf.cache_capacity) < need:
    errors.append(f"{name('cache_capacity')} cannot hold one {c.data.image_size}px keyframe "
                  f"({image_tokens(c)} slots) and a prompt; it must be >= {need}")
  return errors


def validate_inference(c: ml_collections.ConfigDict, prefix: str = "config.inference.") -> None:
  """Checks the director's settings (after ``--set`` overrides); raises ConfigError naming each."""
  errors = inference_errors(c, prefix)
  if errors:
    raise ConfigError("invalid inference settings:\n  " + "\n  ".join(errors))


def validate_model_config(m: ml_collections.ConfigDict) -> None:
  """Checks the ``model`` sub-config only (what building the network needs)."""
  errors = _model_errors(m)
  if errors:
    raise ConfigError("invalid model config:\n  " + "\n  ".join(errors))


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Checks the whole experiment config; raises ConfigError listing every problem."""
  errors = _model_errors(c.model)
  if not errors:
    errors += _data_errors(c)
  errors += _optim_errors(c)
  if "inference" in c and not any(e.startswith("config.data.image_size") for e in errors):
    errors += inference_errors(c)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

