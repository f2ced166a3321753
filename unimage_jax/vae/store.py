"""Where a config's VAE weights come from, and the checks that they fit the model.

``config.model.vae_path`` names one of: the folder ``tools/import_checkpoint.py --format=vae``
(or ``tools/train_vae.py``) writes (``vae/`` Orbax state + ``vae_config.json``), a FLUX
``ae.safetensors`` file, or a diffusers ``vae`` folder (``config.json`` + safetensors; imported on
the fly by ``flux_vae.import_vae``). A missing path or a VAE whose latent space disagrees with
``config.model`` is a :class:`VAEError` naming the field, raised before anything compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimage_jax.config_validation import vae_downsample
from unimage_jax.errors import UserError
from unimage_jax.vae import flux_vae

STATE_DIR = "vae"
CONFIG_FILE = "vae_config.json"


class VAEError(UserError, ValueError):
  """The config's VAE is missing or does not match the model (names config.model.vae_path)."""


def downsample(cfg: flux_vae.VAEConfig) -> int:
  """Pixels per latent cell: one 2x downsampler per level but the last (FLUX: 4 levels -> 8)."""
  return 2 ** (len(cfg.block_out_channels) - 1)


def save_vae(vae: flux_vae.FluxVAE, directory: str) -> None:
  """Writes ``<directory>/vae`` (Orbax StandardSave of the parameters) and ``vae_config.json``."""
  import orbax.checkpoint as ocp

  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(directory, STATE_DIR)), nnx.to_pure_dict(nnx.state(vae, nnx.Param)),
               force=True)
  flux_vae.save_config(vae.config, os.path.join(directory, CONFIG_FILE))


def _read_config(path: str) -> flux_vae.VAEConfig:
  with open(path) as f:
    return flux_vae.VAEConfig.from_diffusers(json.load(f))


def _load_saved(directory: str) -> flux_vae.FluxVAE:
  import orbax.checkpoint as ocp

  cfg = _read_config(os.path.join(directory, CONFIG_FILE))
  abstract = nnx.eval_shape(lambda: flux_vae.FluxVAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(os.path.abspath(os.path.join(directory, STATE_DIR)), target)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_vae(path: str, field: str = "config.model.vae_path") -> flux_vae.FluxVAE:
  """The VAE at ``path`` (any of the module docstring's forms)."""
  if not path:
    raise VAEError(f"{field} is empty: a flux_vae model needs VAE weights (tools/import_checkpoint.py --format=vae "
                   "--source=<ae.safetensors or diffusers vae folder>, or tools/train_vae.py)")
  if not os.path.exists(path):
    raise VAEError(f"{field}={path!r} does not exist (import one with tools/import_checkpoint.py --format=vae, "
                   "or train one with tools/train_vae.py)")
  try:
    if os.path.isdir(os.path.join(path, STATE_DIR)) and os.path.exists(os.path.join(path, CONFIG_FILE)):
      return _load_saved(path)
    return flux_vae.import_vae(path)
  except UserError as e:
    raise VAEError(f"{field}={path!r}: {e}") from None
  except (OSError, ValueError, KeyError) as e:
    raise VAEError(f"{field}={path!r} cannot be read as a VAE ({type(e).__name__}: {e})") from None


def check_matches(vae_cfg: flux_vae.VAEConfig, model_cfg, image_size: int, field: str = "config.model.vae_path") -> None:
  """The VAE's latent space is the model's: channels, downsampling, and the grid fits."""
  bad = []
  model_down = vae_downsample(model_cfg)
  if vae_cfg.latent_channels != model_cfg.latent_channels:
    bad.append(f"the VAE has {vae_cfg.latent_channels} latent channels but config.model.latent_channels="
               f"{model_cfg.latent_channels}")
  if downsample(vae_cfg) != model_down:
    bad.append(f"the VAE downsamples {downsample(vae_cfg)}x but config.model.vae_downsample={model_down}")
  cell = model_down * model_cfg.latent_patch_size
  if image_size % cell or image_size // cell > model_cfg.max_latent_grid:
    bad.append(f"config.data.image_size={image_size} must be a multiple of {cell} with at most "
               f"config.model.max_latent_grid={model_cfg.max_latent_grid} latent patches per side")
  if bad:
    raise VAEError(f"{field}: " + "; ".join(bad))


def load_for_config(config) -> flux_vae.FluxVAE:
  """The VAE ``config.model.vae_path`` names, checked against the model's latent space (errors name
  the fields): what the latent cache and the director encode and decode with."""
  vae = load_vae(config.model.vae_path)
  check_matches(vae.config, config.model, config.data.image_size)
  return vae


def fingerprint(vae: flux_vae.FluxVAE) -> str:
  """sha256 over the VAE's config and parameter bytes: a latent cache records which VAE made it."""
  h = hashlib.sha256(json.dumps(dataclasses.asdict(vae.config), sort_keys=True).encode())
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
  for kp, leaf in sorted(leaves, key=lambda x: jax.tree_util.keystr(x[0])):
    h.update(jax.tree_util.keystr(kp).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()[:16]


def tokens_from_latents(latents: jnp.ndarray, patch: int) -> jnp.ndarray:
  """Normalised NHWC latents ``[B, h*p, w*p, C]`` -> BAGEL tokens ``[B, h*w, p*p*C]`` (its patchify:
  ``[C, h, p, w, p] -> [h, w, p, p, C]``)."""
  b, hp, wp, c = latents.shape
  h, w = hp // patch, wp // patch
  x = latents.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
  return x.reshape(b, h * w, patch * patch * c)


def latents_from_tokens(tokens: jnp.ndarray, h: int, w: int, patch: int) -> jnp.ndarray:
  """Inverse of :func:`tokens_from_latents`: ``[B, h*w, p*p*C] -> [B, h*p, w*p, C]``."""
  b, _, d = tokens.shape
  c = d // (patch * patch)
  x = tokens.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
  return x.reshape(b, h * patch, w * patch, c)


class Codec:
  """Jitted image <-> token maps of one VAE at a fixed batch (static shapes: one compile each).

  ``encode(uint8 [N, H, W, 3]) -> float32 [N, h*w, D]``; ``decode(tokens, h, w) -> uint8 images``.
  The posterior mean is used (BAGEL encodes deterministically at inference; training noise comes
  from the flow objective).
  """

  def __init__(self, vae: flux_vae.FluxVAE, patch: int, batch: int = 8):
    self.vae, self.patch, self.batch = vae, patch, batch
    graphdef, state = nnx.split(vae)
    self._state = state

    @jax.jit
    def enc(state, x):  # [B, H, W, 3] uint8
      model = nnx.merge(graphdef, state)
      z = model.encode(x.astype(jnp.float32) / 127.5 - 1.0)  # [B, h*p, w*p, C]
      return tokens_from_latents(z, patch)

    @jax.jit
    def dec(state, z):  # [B, h*p, w*p, C]
      model = nnx.merge(graphdef, state)
      x = model.decode(z)
      return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    self._enc, self._dec = enc, dec

  def _batched(self, fn, xs: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(xs), self.batch):
      chunk = xs[i:i + self.batch]
      pad = self.batch - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out.append(np.asarray(fn(self._state, chunk))[: self.batch - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def encode(self, images: np.ndarray) -> np.ndarray:
    return self._batched(self._enc, np.asarray(images, np.uint8))

  def decode(self, tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    z = np.asarray(latents_from_tokens(jnp.asarray(tokens, jnp.float32), h, w, self.patch))
    return self._batched(self._dec, z)
