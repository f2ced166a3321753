"""Foreign checkpoints -> our (params, tables): BAGEL-layout safetensors, Qwen2 HF LLMs, SigLIP towers.

Every importer goes through ``keymap.import_tensors`` (one declarative map) with a lazy getter, so
tensors are read one at a time from memory-mapped safetensors. Key and shape problems are always
reported together as ``keymap.KeyMismatchError`` (missing / unexpected / wrong shape), never as a
bare KeyError. The FLUX/diffusers VAE importer lives next to the Flax VAE
(``unimage_jax.vae.flux_vae.import_vae``) because the VAE is not part of the MoT parameter tree.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from unimage_jax.errors import UserError
from unimage_jax.interchange import hf_configs, keymap
from unimage_jax.interchange.keymap import KeyMismatchError
from unimage_jax.interchange.safetensors_io import SafetensorsReader

PyTree = Any


class ConfigMismatchError(UserError, ValueError):
  """The checkpoint's config disagrees with the model config; every differing field is listed."""


def _mismatch_message(what: str, missing=(), unexpected=(), wrong=()) -> str:
  parts = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)):
    items = list(items)
    if items:
      parts.append(f"{len(items)} {label}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
  return f"{what} does not match the model:\n  " + "\n  ".join(parts)


def merge_tensors(sources: Mapping[str, Callable[[], np.ndarray]], base_params: PyTree, base_tables: PyTree,
                  model_cfg: ml_collections.ConfigDict) -> tuple[PyTree, PyTree]:
  """(params, tables) where every BAGEL key in ``sources`` is replaced, the rest kept from ``base``.

  ``sources`` maps a BAGEL key to a zero-argument loader (so nothing is read before it is needed).
  Shapes are checked by ``keymap.import_tensors``.
  """
  from unimage_jax.model import functional

  abstract = functional.abstract_params(model_cfg)
  plan = {e.key: e for e in keymap.export_plan(*abstract, model_cfg)}
  unknown = sorted(set(sources) - set(plan))
  if unknown:
    raise KeyMismatchError(_mismatch_message("import", unexpected=unknown))

  def get(key: str) -> np.ndarray:
    if key in sources:
      return sources[key]()
    return keymap.export_one(plan[key], base_params, base_tables)

  return keymap.import_tensors(get, set(plan), *abstract, model_cfg)


# ------------------------------------------------------------------------------------------ BAGEL
def import_bagel(path: str, model_cfg: ml_collections.ConfigDict | None = None, *,
                 allow_unexpected: bool = False) -> tuple[PyTree, PyTree, ml_collections.ConfigDict]:
  """BAGEL-layout safetensors (our export, or BAGEL's own ``ema.safetensors``) -> (params, tables, cfg).

  ``path`` is a directory (sharded with an index, or plain ``*.safetensors``) or one file. The model
  config defaults to the directory's JSONs (``hf_configs.model_config_from_dir``).
  """
  from unimage_jax.model import functional

  directory = path if os.path.isdir(path) else os.path.dirname(path)
  reader = SafetensorsReader(path)
  if model_cfg is not None:
    cfg = model_cfg
  else:
    cfg = hf_configs.model_config_from_dir(directory)
    if hf_configs.read_json(directory, hf_configs.UNIMAGE_CONFIG) is None:
      cfg = infer_image_config(cfg, reader)
  abstract = functional.abstract_params(cfg)
  params, tables = keymap.import_tensors(reader.__getitem__, reader.keys(), *abstract, cfg,
                                         allow_unexpected=allow_unexpected)
  return params, tables, cfg


def infer_image_config(cfg: ml_collections.ConfigDict, reader: SafetensorsReader) -> ml_collections.ConfigDict:
  """Fills what BAGEL's release JSONs do not state from the tensors themselves.

  BAGEL ships no VAE/latent config (``vae2llm`` gives the latent width, ``latent_pos_embed`` the
  grid) and its ``vit_config.json`` names SigLIP's 27 layers while the checkpoint keeps 26.
  """
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if "vae2llm.weight" in reader:
    token_dim = reader.shape("vae2llm.weight")[1]
    channels = token_dim // cfg.latent_patch_size**2
    cfg.latent_channels = channels
    if channels == 16:
      cfg.autoencoder = "flux_vae"
    elif cfg.autoencoder == "pixel":
      cfg.pixel_downsample = int(round((channels / 3) ** 0.5))
  if "latent_pos_embed.pos_embed" in reader:
    cfg.max_latent_grid = int(round(reader.shape("latent_pos_embed.pos_embed")[0] ** 0.5))
  vit_layers = {int(k.split(".")[4]) for k in reader.keys() if k.startswith("vit_model.vision_model.encoder.layers.")}
  if cfg.vit.enabled and vit_layers:
    cfg.vit.num_layers = max(vit_layers) + 1
  return cfg


# ------------------------------------------------------------------------------------------ Qwen2
def _read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: a Hugging Face checkpoint directory is expected")
  with open(path) as f:
    return json.load(f)


def check_llm_config(hf_config: dict, model_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigMismatchError listing every LLM field where the HF config and ours differ.

  ``qk_norm`` is exempt: BAGEL adds fresh q/k norms to a Qwen2 LLM that has none.
  """
  want = hf_configs.llm_overrides(hf_config)
  want.pop("qk_norm")
  bad = [f"config.model.{k}={model_cfg[k]} but the checkpoint has {v}"
         for k, v in want.items() if (model_cfg[k] != v if not isinstance(v, float) else abs(model_cfg[k] - v) > 1e-12 * abs(v))]
  if bad:
    raise ConfigMismatchError("the Qwen2 checkpoint's config.json does not match the model config:\n  " + "\n  ".join(bad))


def import_qwen2(hf_dir: str, model_cfg: ml_collections.ConfigDict, *, base: tuple[PyTree, PyTree] | None = None,
                 seed: int = 0, allow_unexpected: bool = False) -> tuple[PyTree, PyTree]:
  """A Qwen2/Qwen2.5 (or Qwen3) HF checkpoint directory -> (params, tables).

  The LLM weights fill the und expert and are copied into the gen expert (BAGEL's initialisation);
  everything the LLM lacks (q/k norms when absent, image heads, ViT, connector) comes from ``base``
  or, by default, from a fresh ``init_params(model_cfg, seed)``. Tied embeddings (small Qwen2.5
  models) feed ``lm_head`` from ``embed_tokens``.
  """
  from unimage_jax.model import functional

  hf_config = _read_hf_config(hf_dir)
  check_llm_config(hf_config, model_cfg)
  reader = SafetensorsReader(hf_dir)
  hf_keys = set(reader.keys())
  if "lm_head.weight" not in hf_keys and hf_config.get("tie_word_embeddings", False):
    alias = {"lm_head.weight": "model.embed_tokens.weight"}
  else:
    alias = {}
  names = {k: k for k in hf_keys | set(alias)}
  bagel_to_hf = keymap.llm_to_bagel_state(names, model_cfg)  # BAGEL key -> HF key (gen shares und's)
  abstract = functional.abstract_params(model_cfg)
  plan = keymap.export_plan(*abstract, model_cfg)
  optional = ("q_norm", "k_norm")  # Qwen2 has none: fresh ones, as in BAGEL
  expected = {e.key.removeprefix("language_model.") for e in plan
              if e.key.startswith("language_model.") and "_moe_gen" not in e.key
              and not any(o in e.key for o in optional)}
  missing = sorted(expected - set(names))
  ignorable = lambda k: k.endswith("rotary_emb.inv_freq")
  unexpected = sorted(k for k in hf_keys - set(bagel_to_hf.values()) if not ignorable(k))
  shapes = {e.key: e.shape for e in plan}
  wrong = [f"{hf}: checkpoint has {reader.shape(alias.get(hf, hf))}, model expects {shapes[key]}"
           for key, hf in bagel_to_hf.items() if reader.shape(alias.get(hf, hf)) != shapes[key]]
  if missing or wrong or (unexpected and not allow_unexpected):
    raise KeyMismatchError(_mismatch_message(f"Qwen2 checkpoint {hf_dir}", missing,
                                             [] if allow_unexpected else unexpected, wrong))
  if base is None:
    base = functional.init_params(model_cfg, seed)
  sources = {key: (lambda hf=alias.get(hf, hf): reader[hf]) for key, hf in bagel_to_hf.items()}
  return merge_tensors(sources, *base, model_cfg)


# ------------------------------------------------------------------------------------------ SigLIP
def siglip_conv_to_linear(w: np.ndarray) -> np.ndarray:
  """SigLIP patch conv ``[E, C, p, p]`` -> BAGEL's Linear ``[E, p*p*C]`` over ``(p, p, c)`` pixels."""
  return np.ascontiguousarray(np.transpose(w, (0, 2, 3, 1)).reshape(w.shape[0], -1))


_SIGLIP_VISION_ROOTS = ("embeddings", "encoder", "post_layernorm", "head")


def siglip_sources(state: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
                   *, allow_unexpected: bool = False) -> dict[str, Callable[[], np.ndarray]]:
  """BAGEL ``vit_model.*`` loaders from a HF SiglipVisionModel (or SiglipModel) state mapping.

  Dropped on purpose: the attention-pooling ``head`` (BAGEL uses patch features) and encoder layers
  beyond ``config.model.vit.num_layers`` (BAGEL keeps 26 of so400m's 27).
  """
  n_layers = model_cfg.vit.num_layers
  sources, unexpected = {}, []
  for key in state.keys():
    # transformers <5 writes ``vision_model.*``; 5.x writes a SiglipVisionModel's keys bare
    k = key.removeprefix("model.").removeprefix("vision_model.")
    parts = k.split(".")
    if parts[0] not in _SIGLIP_VISION_ROOTS:
      if not k.startswith(("text_model.", "logit_scale", "logit_bias")):
        unexpected.append(key)
      continue
    if parts[0] == "head" or k.endswith("embeddings.position_ids"):
      continue
    if parts[:2] == ["encoder", "layers"] and int(parts[2]) >= n_layers:
      continue
    load = (lambda key=key: siglip_conv_to_linear(np.asarray(state[key]))) if k.endswith(
        "patch_embedding.weight") and np.ndim(state[key]) == 4 else (lambda key=key: np.asarray(state[key]))
    sources["vit_model.vision_model." + k] = load
  if unexpected and not allow_unexpected:
    raise KeyMismatchError(_mismatch_message("SigLIP checkpoint", unexpected=unexpected))
  return sources


def import_siglip(path: str, model_cfg: ml_collections.ConfigDict, base: tuple[PyTree, PyTree], *,
                  allow_unexpected: bool = False) -> tuple[PyTree, PyTree]:
  """SigLIP vision weights (HF directory or safetensors file) into ``base``'s ``vit_model`` subtree."""
  from unimage_jax.model import functional

  if not model_cfg.vit.enabled:
    raise ValueError("config.model.vit.enabled is False: there is no ViT to import SigLIP weights into")
  reader = SafetensorsReader(path)
  sources = siglip_sources(reader, model_cfg, allow_unexpected=allow_unexpected)
  abstract = functional.abstract_params(model_cfg)
  expected = {e.key for e in keymap.export_plan(*abstract, model_cfg) if e.key.startswith("vit_model.")}
  missing = sorted(expected - set(sources))
  if missing:
    raise KeyMismatchError(_mismatch_message(f"SigLIP checkpoint {path}", missing))
  return merge_tensors(sources, *base, model_cfg)
