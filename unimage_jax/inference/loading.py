"""A director's checkpoint and settings: params, the config they were saved with (given the
inference defaults an older checkpoint lacks), the run's tokenizer, and ``--set`` overrides."""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
from absl import logging

from unimage_jax import tokenizer as tokenizer_lib
from unimage_jax.config_base import base_config
from unimage_jax.config_validation import ConfigError, validate_inference
from unimage_jax.errors import UserError
from unimage_jax.inference.storyboard import DirectorError
from unimage_jax.interchange import orbax_io
from unimage_jax.tokenizer import Tokenizer

_DEFAULT_INFERENCE = base_config().inference  # settings a checkpoint saved before them can take by --set


def find_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The run's own copy (``tokenizer.model`` or ``tokenizer.json``, as the trainer wrote it), else
  ``config.data.tokenizer_path``."""
  own = os.path.join(workdir, tokenizer_lib.workdir_copy_name(config.data.tokenizer_path))
  for path in (own, config.data.tokenizer_path):
    if path and os.path.exists(tokenizer_lib.tokenizer_file(path)):
      return path
  raise DirectorError(f"no tokenizer: neither {own} nor config.data.tokenizer_path="
                      f"{config.data.tokenizer_path!r} exists")


def load(workdir: str, step: int | None, use_ema: bool) -> tuple[orbax_io.LoadedCheckpoint, Tokenizer]:
  """The newest step of ``workdir`` that reads completely (or exactly ``step``), its config (with
  ``inference`` defaults when saved before that block) and the run's tokenizer."""
  try:
    loaded = orbax_io.load_checkpoint(workdir, step, use_ema=use_ema)  # the readers' fallback
  except UserError as e:
    raise DirectorError(str(e)) from e
  if "inference" not in loaded.config:
    loaded.config.inference = _DEFAULT_INFERENCE.copy_and_resolve_references()
  try:
    tok = tokenizer_lib.load_tokenizer(find_tokenizer(workdir, loaded.config),
                                       max_vocab_size=loaded.config.model.vocab_size)
  except ValueError as e:
    raise DirectorError(str(e)) from None
  return loaded, tok


def check_settings(config: ml_collections.ConfigDict, prefix: str = "config.inference.") -> None:
  """The sampling settings, before anything is compiled or sampled."""
  try:
    validate_inference(config, prefix)
  except ConfigError as e:
    raise DirectorError(str(e)) from None


def apply_overrides(inference: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """``key=value`` items (the tools' ``--set``) onto ``inference``, typed like the default. Unknown
  keys and unparsable values name the item."""
  for item in overrides:
    if "=" not in item:
      raise DirectorError(f"--set={item!r} must be key=value")
    key, value = item.split("=", 1)
    if key not in inference and key in _DEFAULT_INFERENCE:  # a setting newer than the checkpoint
      inference[key] = _DEFAULT_INFERENCE[key]
    if key not in inference:
      raise DirectorError(f"--set: unknown inference setting {key!r}; known: {sorted(inference.keys())}")
    old = inference[key]
    try:
      if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        inference[key] = value.lower() in ("true", "1")
      elif isinstance(old, (int, float)):
        inference[key] = type(old)(float(value))
      elif isinstance(old, (tuple, list)):
        inference[key] = tuple(float(x) for x in value.split(","))
      else:
        inference[key] = value
    except ValueError:
      raise DirectorError(f"--set={item}: {value!r} is not a {type(old).__name__}") from None


def warn_unguided(overrides: Sequence[str], mode: str) -> None:
  """Guidance settings on a director that draws interleaved: said once, since they do nothing."""
  guidance = sorted({item.split("=", 1)[0] for item in overrides if item.startswith("cfg_")})
  if guidance and mode == "interleaved":
    # only the keyframe task trains the rows without text / images (conditioning dropout); an
    # interleaved draw has no trained unconditional branch, so it samples unguided
    logging.warning("--set %s: classifier-free guidance applies to the disentangled layout only; this "
                    "director draws interleaved (config.inference.mode / its task mixture), unguided",
                    ", ".join(guidance))
