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

  ``path`` is a directory (``ema.safetensors``, shards with an index, or plain ``*.safetensors``;
  a release's ``ae.safetensors`` is not model weights) or one file. The model config defaults to
  :func:`bagel_model_config`: the directory's JSONs, with what the tensors say winning.
  """
  from unimage_jax.model import functional

  reader = SafetensorsReader(path)
  cfg = model_cfg if model_cfg is not None else bagel_model_config(path, reader=reader)
  abstract = functional.abstract_params(cfg)
  params, tables = keymap.import_tensors(reader.__getitem__, reader.keys(), *abstract, cfg,
                                         allow_unexpected=allow_unexpected)
  return params, tables, cfg


def bagel_model_config(path: str, base: ml_collections.ConfigDict | None = None, *,
                       reader: SafetensorsReader | None = None) -> ml_collections.ConfigDict:
  """Our ``model`` config for a BAGEL-layout folder (or file): exactly ours when it holds our
  ``unimage_config.json``; otherwise ``base`` (default ``base_config().model``) updated from its
  JSONs and then from the tensors' shapes (:func:`infer_from_tensors`)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if hf_configs.read_json(directory, hf_configs.UNIMAGE_CONFIG) is not None:
    return hf_configs.model_config_from_dir(directory)
  cfg = hf_configs.model_config_from_dir(directory, base)
  return infer_from_tensors(cfg, reader or SafetensorsReader(path))


def _layer_count(keys, prefix: str) -> int:
  idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
  return max(idx) + 1 if idx else 0


_LLM = "language_model.model."
_VIT = "vit_model.vision_model."


def infer_from_tensors(cfg: ml_collections.ConfigDict, reader: SafetensorsReader) -> ml_collections.ConfigDict:
  """Sets every architecture field the tensors determine; the JSONs keep only what shapes cannot say
  (``rope_theta``, norm epsilons, the ViT's head count, ``head_dim`` without q/k norms).

  Why: BAGEL's release JSONs do not state the latent space (``vae2llm`` gives its width,
  ``latent_pos_embed`` the grid), its ``vit_config.json`` names one SigLIP layer more than the
  checkpoint keeps, and its ``llm_config.json`` may not mention ``qk_norm``.
  """
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  keys = reader.keys()
  shape = reader.shape
  if _LLM + "embed_tokens.weight" in reader:
    cfg.vocab_size, cfg.hidden_size = shape(_LLM + "embed_tokens.weight")
  n_layers = _layer_count(keys, _LLM + "layers.")
  if n_layers:
    cfg.num_layers = n_layers
    attn = _LLM + "layers.0.self_attn."
    cfg.qk_norm = attn + "q_norm.weight" in reader
    if cfg.qk_norm:
      cfg.head_dim = shape(attn + "q_norm.weight")[0]
    if attn + "q_proj.weight" in reader:
      cfg.num_heads = shape(attn + "q_proj.weight")[0] // cfg.head_dim
      cfg.num_kv_heads = shape(attn + "k_proj.weight")[0] // cfg.head_dim
    if _LLM + "layers.0.mlp.gate_proj.weight" in reader:
      cfg.mlp_dim = shape(_LLM + "layers.0.mlp.gate_proj.weight")[0]
  if "vae2llm.weight" in reader:
    token_dim = shape("vae2llm.weight")[1]
    channels = token_dim // cfg.latent_patch_size**2
    cfg.latent_channels = channels
    if channels == 16:
      cfg.autoencoder = "flux_vae"
    else:
      cfg.autoencoder = "pixel"
      cfg.pixel_downsample = int(round((channels / 3) ** 0.5))
  if "latent_pos_embed.pos_embed" in reader:
    cfg.max_latent_grid = int(round(shape("latent_pos_embed.pos_embed")[0] ** 0.5))
  vit_layers = _layer_count(keys, _VIT + "encoder.layers.")
  cfg.vit.enabled = bool(vit_layers)
  if vit_layers:
    cfg.vit.num_layers = vit_layers
    patch = _VIT + "embeddings.patch_embedding.weight"
    if patch in reader:
      cfg.vit.hidden_size = shape(patch)[0]
      cfg.vit.patch_size = int(round((shape(patch)[1] / 3) ** 0.5))
    fc1 = _VIT + "encoder.layers.0.mlp.fc1.weight"
    if fc1 in reader:
      cfg.vit.mlp_dim = shape(fc1)[0]
    if "vit_pos_embed.pos_embed" in reader:
      cfg.vit.max_patches_per_side = int(round(shape("vit_pos_embed.pos_embed")[0] ** 0.5))
  return cfg


# Model fields a checkpoint fixes: a --config may not change them (every other model field, e.g.
# dtypes, remat, attention implementation, is how the model runs and comes from the --config).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim", "rope_theta", "rms_norm_eps", "qk_norm", "autoencoder", "latent_channels",
                       "latent_patch_size", "max_latent_grid")
VIT_ARCHITECTURE_FIELDS = ("enabled", "hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size",
                           "max_patches_per_side", "layer_norm_eps")


def architecture_conflicts(requested: ml_collections.ConfigDict, checkpoint: ml_collections.ConfigDict) -> list[str]:
  """``config.model.X=a but the checkpoint has b`` for every architecture field that differs."""
  def differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
      return abs(float(a) - float(b)) > 1e-9 * max(abs(float(a)), abs(float(b)), 1e-30)
    return a != b

  fields = [(f, requested[f], checkpoint[f]) for f in ARCHITECTURE_FIELDS]
  if checkpoint.autoencoder == "pixel":
    fields.append(("pixel_downsample", requested.pixel_downsample, checkpoint.pixel_downsample))
  vit_fields = VIT_ARCHITECTURE_FIELDS if checkpoint.vit.enabled and requested.vit.enabled else ("enabled",)
  fields += [(f"vit.{f}", requested.vit[f], checkpoint.vit[f]) for f in vit_fields]
  return [f"config.model.{name}={a!r} but the checkpoint has {b!r}" for name, a, b in fields if differs(a, b)]


def config_for_checkpoint(requested: ml_collections.ConfigDict, checkpoint_model: ml_collections.ConfigDict,
                          source: str) -> ml_collections.ConfigDict:
  """``requested`` (a whole experiment config) with the checkpoint's architecture; refuses, with
  the list, any architecture field the two disagree on (a --config trains the checkpoint, it
  cannot reshape it)."""
  bad = architecture_conflicts(requested.model, checkpoint_model)
  if bad:
    raise ConfigMismatchError(f"--config disagrees with the checkpoint {source} on its shape (drop these "
                              "overrides or pick the matching config):\n  " + "\n  ".join(bad))
  config = requested.copy_and_resolve_references()
  for f in ARCHITECTURE_FIELDS:
    config.model[f] = checkpoint_model[f]
  config.model.pixel_downsample = checkpoint_model.pixel_downsample
  for f in VIT_ARCHITECTURE_FIELDS:
    config.model.vit[f] = checkpoint_model.vit[f]
  return config


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
