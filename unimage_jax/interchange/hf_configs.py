"""Config JSONs that travel with exported weights, and the reverse mapping into our model config.

BAGEL ships ``llm_config.json`` (a Qwen2 config plus ``qk_norm`` and the MoT layer name) and
``vit_config.json`` (a SigLIP vision config); we add ``vae_config.json`` (latent space and grid)
and ``unimage_config.json`` (our whole ``model`` sub-config, so our own round trip is exact).
The PyTorch serving module reads only the first three, so it needs neither JAX nor ml_collections.

BAGEL's conventions, which its stock loaders apply when they read these files (and so must we):
``vit_config.json``'s ``num_hidden_layers`` is the SigLIP depth *plus one* (the loaders build
``num_hidden_layers - 1`` layers: BAGEL reads features before SigLIP's last layer), and q/k norms
are always on (the loaders force ``qk_norm = True``; a release ``llm_config.json`` may not say it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from unimage_jax.config_validation import flow_prediction, latent_downsample
from unimage_jax.vae.flux_vae import FLUX_SCALE, FLUX_SHIFT

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
VAE_CONFIG = "vae_config.json"
UNIMAGE_CONFIG = "unimage_config.json"

# ``vit_config.json`` names one SigLIP layer more than the model keeps (BAGEL's loaders drop it).
BAGEL_VIT_LAYER_OFFSET = 1


def llm_config(m: ml_collections.ConfigDict, torch_dtype: str = "float32") -> dict[str, Any]:
  """Qwen2-style config of the MoT language model (BAGEL's ``llm_config.json`` fields)."""
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": m.vocab_size,
      "hidden_size": m.hidden_size,
      "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim,
      "hidden_act": "silu",
      "rope_theta": m.rope_theta,
      "rms_norm_eps": m.rms_norm_eps,
      "max_position_embeddings": 32768,
      "tie_word_embeddings": False,
      "use_sliding_window": False,
      "qk_norm": bool(m.qk_norm),
      "layer_module": "Qwen2MoTDecoderLayer",
      "torch_dtype": torch_dtype,
  }


def vit_config(m: ml_collections.ConfigDict, torch_dtype: str = "float32") -> dict[str, Any]:
  """SigLIP vision config; ``image_size`` is chosen so the position table is ``max_patches_per_side``^2."""
  v = m.vit
  return {
      "architectures": ["SiglipVisionModel"],
      "model_type": "siglip_vision_model",
      "hidden_size": v.hidden_size,
      "intermediate_size": v.mlp_dim,
      "num_hidden_layers": v.num_layers + BAGEL_VIT_LAYER_OFFSET,  # BAGEL's loaders build n - 1
      "num_attention_heads": v.num_heads,
      "num_channels": 3,
      "patch_size": v.patch_size,
      "image_size": v.patch_size * v.max_patches_per_side,
      "layer_norm_eps": v.layer_norm_eps,
      "hidden_act": "gelu_pytorch_tanh",
      "attention_dropout": 0.0,
      "torch_dtype": torch_dtype,
  }


def vae_config(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """Latent space of the image tokens: what the serving side needs to (un)patchify and decode."""
  flux = m.autoencoder == "flux_vae"
  return {
      "autoencoder": m.autoencoder,
      "latent_channels": m.latent_channels,
      "downsample": latent_downsample(m),
      "scale_factor": FLUX_SCALE if flux else 1.0,
      "shift_factor": FLUX_SHIFT if flux else 0.0,
      "latent_patch_size": m.latent_patch_size,
      "max_latent_size": m.max_latent_grid,
      "timestep_shift": m.timestep_shift,
      # "x0": llm2vae predicts the clean latent (velocity = (x_t - x0) / max(t, 0.05)); BAGEL's own
      # code reads llm2vae as the velocity, so it serves only "velocity" checkpoints
      "flow_prediction": flow_prediction(m),
      "vit_enabled": bool(m.vit.enabled),
      "vit_max_num_patch_per_side": m.vit.max_patches_per_side,
      "connector_act": "gelu_pytorch_tanh",
  }


def write_configs(directory: str, m: ml_collections.ConfigDict, torch_dtype: str) -> None:
  os.makedirs(directory, exist_ok=True)
  files = {LLM_CONFIG: llm_config(m, torch_dtype), VAE_CONFIG: vae_config(m),
           UNIMAGE_CONFIG: json.loads(m.to_json())}
  if m.vit.enabled:
    files[VIT_CONFIG] = vit_config(m, torch_dtype)
  for name, content in files.items():
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=2)


def read_json(directory: str, name: str) -> dict[str, Any] | None:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def llm_overrides(llm: dict[str, Any]) -> dict[str, Any]:
  """Our ``model.*`` fields from a Qwen2 (or BAGEL llm) config dict; absent ``qk_norm`` means on
  (BAGEL's behaviour: its loaders set it whatever the file says)."""
  heads = llm["num_attention_heads"]
  return {
      "vocab_size": llm["vocab_size"],
      "hidden_size": llm["hidden_size"],
      "mlp_dim": llm["intermediate_size"],
      "num_layers": llm["num_hidden_layers"],
      "num_heads": heads,
      "num_kv_heads": llm.get("num_key_value_heads", heads),
      "head_dim": llm.get("head_dim") or llm["hidden_size"] // heads,
      "rope_theta": float(llm.get("rope_theta", (llm.get("rope_parameters") or {}).get("rope_theta", 1e4))),
      "rms_norm_eps": float(llm.get("rms_norm_eps", 1e-6)),
      "qk_norm": bool(llm.get("qk_norm", True)),
  }


def vit_overrides(vit: dict[str, Any]) -> dict[str, Any]:
  """Our ``model.vit.*`` fields from a BAGEL ``vit_config.json`` (kept depth = ``num_hidden_layers - 1``)."""
  return {
      "enabled": True,
      "hidden_size": vit["hidden_size"],
      "mlp_dim": vit["intermediate_size"],
      "num_layers": vit["num_hidden_layers"] - BAGEL_VIT_LAYER_OFFSET,
      "num_heads": vit["num_attention_heads"],
      "patch_size": vit["patch_size"],
      "max_patches_per_side": vit["image_size"] // vit["patch_size"],
      "layer_norm_eps": float(vit.get("layer_norm_eps", 1e-6)),
  }


def model_config_from_dir(directory: str, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Our ``model`` config for an exported/BAGEL directory.

  ``unimage_config.json`` (written by our exporter) wins; otherwise the fields are derived from
  ``llm_config.json``, ``vit_config.json`` and ``vae_config.json`` on top of ``base``.
  """
  ours = read_json(directory, UNIMAGE_CONFIG)
  if ours is not None:
    return ml_collections.ConfigDict(ours)
  if base is None:
    from unimage_jax.config_base import base_config
    base = base_config().model
  m = ml_collections.ConfigDict(base.to_dict())
  llm = read_json(directory, LLM_CONFIG) or read_json(directory, "config.json")
  if llm is None:
    raise FileNotFoundError(f"{directory} has neither {UNIMAGE_CONFIG}, {LLM_CONFIG} nor config.json")
  m.update(llm_overrides(llm))
  vit = read_json(directory, VIT_CONFIG)
  if vit is not None:
    m.vit.update(vit_overrides(vit))
  else:
    m.vit.enabled = False
  vae = read_json(directory, VAE_CONFIG)
  if vae is not None:
    m.update(autoencoder=vae["autoencoder"], latent_channels=vae["latent_channels"],
             latent_patch_size=vae["latent_patch_size"], max_latent_grid=vae["max_latent_size"],
             timestep_shift=vae.get("timestep_shift", m.timestep_shift),
             flow_prediction=vae.get("flow_prediction", "velocity"))
    if vae["autoencoder"] == "pixel":
      m.pixel_downsample = vae["downsample"]
    else:
      m.vae_downsample = vae["downsample"]
  return m
