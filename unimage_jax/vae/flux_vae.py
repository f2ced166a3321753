"""FLUX-style VAE in Flax NNX, structured like diffusers' ``AutoencoderKL`` so weights map by name.

FLUX settings (the defaults): 16 latent channels, 8x downsampling (block channels 128/256/512/512,
2 ResNet blocks per level), no quant/post-quant convs, one single-head attention in each mid block,
latent normalisation ``z = 0.3611 * (z_raw - 0.1159)`` (docs/ARCHITECTURE.md §10). Sizes are
configurable so tests run a tiny copy against diffusers.

Layout: NHWC arrays (JAX's convolution layout); torch/diffusers weights are converted on import
(conv ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``, linear ``[O, I]`` -> ``[I, O]``). Both diffusers'
key names and the original FLUX/BAGEL ``ae.safetensors`` names (``encoder.down.0.block.0...``)
import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # FLUX's latent normalisation: z = FLUX_SCALE * (z_raw - FLUX_SHIFT)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  scaling_factor: float = FLUX_SCALE
  shift_factor: float = FLUX_SHIFT

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """From a diffusers ``AutoencoderKL`` config dict (``config.json`` of a ``vae`` folder)."""
    if config.get("use_quant_conv", False) or config.get("use_post_quant_conv", False):
      raise ValueError("only FLUX-style VAEs (use_quant_conv=False, use_post_quant_conv=False) are supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
    return cls(**{k: v for k, v in kw.items() if v is not None})


def save_config(config: VAEConfig, path: str) -> None:
  with open(path, "w") as f:
    json.dump({**dataclasses.asdict(config), "use_quant_conv": False, "use_post_quant_conv": False}, f, indent=2)


def _norm(c: int, cfg: VAEConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(c, num_groups=cfg.norm_num_groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


def _conv(i: int, o: int, k: int, rngs: nnx.Rngs, stride: int = 1, padding: Any = "SAME") -> nnx.Conv:
  return nnx.Conv(i, o, (k, k), strides=stride, padding=padding, rngs=rngs)


class ResnetBlock(nnx.Module):
  """diffusers ``ResnetBlock2D`` without time embedding: ``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

  def __init__(self, i: int, o: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.norm1, self.conv1 = _norm(i, cfg, rngs), _conv(i, o, 3, rngs)
    self.norm2, self.conv2 = _norm(o, cfg, rngs), _conv(o, o, 3, rngs)
    self.conv_shortcut = _conv(i, o, 1, rngs) if i != o else None

  def __call__(self, x):  # [B, H, W, C]
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over all pixels (diffusers ``Attention`` as used by the VAE mid block)."""

  def __init__(self, c: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.group_norm = _norm(c, cfg, rngs)
    self.to_q, self.to_k, self.to_v = (nnx.Linear(c, c, rngs=rngs) for _ in range(3))
    self.to_out = nnx.List([nnx.Linear(c, c, rngs=rngs)])

  def __call__(self, x):  # [B, H, W, C]
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)  # [B, HW, C]
    scores = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(jnp.float32(c))
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, axis=-1), v)
    return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, c: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(c, c, cfg, rngs), ResnetBlock(c, c, cfg, rngs)])
    self.attentions = nnx.List([Attention(c, cfg, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  """Asymmetric pad (right/bottom by one) then a stride-2 3x3 conv, as diffusers' ``Downsample2D(padding=0)``."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x then a 3x3 conv."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(self, i: int, o: int, n: int, down: bool, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(i if j == 0 else o, o, cfg, rngs) for j in range(n)])
    self.downsamplers = nnx.List([Downsample(o, rngs)]) if down else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nnx.Module):
  def __init__(self, i: int, o: int, n: int, up: bool, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(i if j == 0 else o, o, cfg, rngs) for j in range(n)])
    self.upsamplers = nnx.List([Upsample(o, rngs)]) if up else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    ch = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, cfg, rngs) for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], cfg, rngs)
    self.conv_norm_out = _norm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs)

  def __call__(self, x):  # [B, H, W, 3] -> moments [B, H/f, W/f, 2*latent]
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    ch = tuple(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, ch[0], 3, rngs)
    self.mid_block = MidBlock(ch[0], cfg, rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, i < len(ch) - 1, cfg, rngs) for i in range(len(ch))])
    self.conv_norm_out = _norm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], cfg.out_channels, 3, rngs)

  def __call__(self, z):  # [B, h, w, latent] -> [B, h*f, w*f, 3]
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class FluxVAE(nnx.Module):
  """``encode``: images in [-1, 1] -> normalised latents; ``decode``: the inverse map (NHWC)."""

  def __init__(self, config: VAEConfig = VAEConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs)
    self.decoder = Decoder(config, rngs)

  def encode_moments(self, x):
    """Raw posterior (mean, logvar), each ``[B, h, w, latent]`` (diffusers' ``latent_dist``)."""
    moments = self.encoder(x)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x, rng: jax.Array | None = None):
    """Normalised latents ``scale * (z - shift)``; the posterior mean unless ``rng`` asks for a sample."""
    mean, logvar = self.encode_moments(x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.config.scaling_factor * (z - self.config.shift_factor)

  def decode_raw(self, z):
    return self.decoder(z)

  def decode(self, latents):
    """Normalised latents -> images (inverts :meth:`encode`'s normalisation)."""
    return self.decoder(latents / self.config.scaling_factor + self.config.shift_factor)


# ------------------------------------------------------------------------------------ weight import
def _torch_key(path: Sequence[Any]) -> str:
  *mods, leaf = (str(p) for p in path)
  return ".".join([*mods, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _to_flax(w: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and len(target_shape) == 4:
    w = w.reshape(w.shape[:2] + target_shape[:2]) if w.ndim == 2 else w  # 1x1 conv stored as linear
    return np.transpose(w, (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel":
    return np.transpose(w.reshape(w.shape[0], -1))  # [O, I] (or 1x1 conv [O, I, 1, 1]) -> [I, O]
  return w


_BFL_PATTERNS = [  # original FLUX/BAGEL ae.safetensors names -> diffusers names (up blocks reversed below)
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
]


def bfl_to_diffusers_key(key: str, num_levels: int) -> str:
  """One original-FLUX VAE key in diffusers naming (decoder ``up.i`` is ``up_blocks.(n-1-i)``)."""
  m = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$", key)
  if m:
    level = num_levels - 1 - int(m.group(1))
    inner = f"resnets.{m.group(3)}" if m.group(3) is not None else "upsamplers.0"
    key = f"decoder.up_blocks.{level}.{inner}.{m.group(4)}"
  for pattern, repl in _BFL_PATTERNS:
    key = re.sub(pattern, repl, key)
  return key


def load_vae_state(model: FluxVAE, state: Mapping[str, Any], *, allow_unexpected: bool = False) -> None:
  """Loads a diffusers- or FLUX-named torch state mapping (numpy values) into ``model`` in place.

  Raises ``keymap.KeyMismatchError`` listing every missing, unexpected and wrong-shape tensor.
  """
  from unimage_jax.interchange.keymap import KeyMismatchError

  n = len(model.config.block_out_channels)
  names = {}
  for k in state.keys():
    names.setdefault(bfl_to_diffusers_key(k.removeprefix("vae."), n), k)
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  missing, wrong, used, new = [], [], set(), []
  for kp, leaf in leaves:
    path = [getattr(k, "key", getattr(k, "idx", None)) for k in kp]
    key = _torch_key(path)
    target = tuple(leaf.shape)
    new.append(leaf)
    if key not in names:
      missing.append(key)
      continue
    used.add(names[key])
    value = _to_flax(np.asarray(state[names[key]], np.float32), str(path[-1]), target)
    if tuple(value.shape) != target:
      wrong.append(f"{names[key]}: checkpoint has {tuple(np.shape(state[names[key]]))}, model expects {target} (flax layout)")
      continue
    new[-1] = jnp.asarray(value, leaf.dtype)
  unexpected = sorted(set(state.keys()) - used)
  problems = []
  for label, items in (("missing", missing), ("unexpected", [] if allow_unexpected else unexpected),
                       ("with wrong shape", wrong)):
    if items:
      problems.append(f"{len(items)} {label}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
  if problems:
    raise KeyMismatchError("VAE checkpoint does not match the model:\n  " + "\n  ".join(problems))
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, params)


def import_vae(path: str, config: VAEConfig | None = None, *, allow_unexpected: bool = False) -> FluxVAE:
  """A FLUX VAE from a diffusers ``vae`` folder (config.json + safetensors) or an ``ae.safetensors`` file.

  Without ``config`` the folder's ``config.json`` is used, else FLUX's defaults.
  """
  from unimage_jax.interchange.safetensors_io import SafetensorsReader

  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if config is None:
    cfg_path = os.path.join(directory, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    else:
      config = VAEConfig()
  model = nnx.eval_shape(lambda: FluxVAE(config, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)  # placeholders, all overwritten
  model = nnx.merge(graphdef, state)
  load_vae_state(model, SafetensorsReader(path), allow_unexpected=allow_unexpected)
  return model
