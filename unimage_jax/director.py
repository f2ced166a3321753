"""The director: prompt -> script (und expert, KV cache) -> one keyframe per shot (gen expert).

The public face of ``unimage_jax/inference/``; each piece has one job:

* ``loading.py``: the checkpoint, its config (with inference defaults) and tokenizer; ``--set``.
* ``image_codec.py``: keyframe pixels <-> latent tokens (the pixel codec or the FLUX VAE).
* ``director_layout.py``: which layout is drawn, what a prompt may be, the segments and their slots
  (the planner's layout, ``unimage_jax/prompt_layout.py``).
* ``script_writing.py``: the und expert writes the script (disentangled) or writes it between the
  keyframes it asks for (interleaved), constrained by the schema.
* ``keyframe_drawing.py``: keyframes for a script, each after its context, with guidance.
* ``attempts.py``: resampling until the script is usable.

Two layouts mirror the training tasks (``data_pipelines/sequence_plan.py``): ``interleaved``
(stage-1 checkpoints) and ``disentangled`` (stage-2 checkpoints). Continuation: an existing
storyboard's script (and keyframes) become the pre-context and the model writes further shots.
Reference images (a character sheet, a location photo) are encoded like context keyframes
(``[ViT copy] [clean latents]``) and put before everything else in the rows that see images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np

from unimage_jax import script_schema
from unimage_jax.inference import attempts, director_layout, image_codec, loading
from unimage_jax.inference.director_layout import DirectorLayout
from unimage_jax.inference.engine import Engine
from unimage_jax.inference.keyframe_drawing import KeyframeDrawer
from unimage_jax.inference.kv_cache import CacheFullError
from unimage_jax.inference.script_writing import ScriptWriter
from unimage_jax.inference.storyboard import DirectorError, Storyboard
from unimage_jax.model import functional
from unimage_jax.script_schema import Script
from unimage_jax.tokenizer import Tokenizer

__all__ = ["Director", "DirectorError", "Storyboard"]


class Director:
  """Holds a model and its tokenizer; ``direct`` turns a prompt into a storyboard."""

  step: int | None = None  # the checkpoint step, when loaded from one

  def __init__(self, config: ml_collections.ConfigDict, params, tables, tokenizer: Tokenizer, vae=None):
    self.config = config
    self.inf = config.inference
    self.tok = tokenizer
    self.engine = Engine(functional.model_def(config.model), params, tables, config.model)
    self.codec = image_codec.for_config(config, vae)
    self.layout = DirectorLayout(config, tokenizer, self.codec)
    self.keyframes = KeyframeDrawer(self.engine, self.layout, config)
    self.writer = ScriptWriter(self.engine, self.layout, self.keyframes, config)

  @classmethod
  def from_checkpoint(cls, workdir: str, *, step: int | None = None, use_ema: bool = True) -> "Director":
    """The newest step of ``workdir`` that reads completely (or exactly ``step``), with the config
    it was saved with; an unreadable newest step is reported and the previous one is used."""
    loaded, tok = loading.load(workdir, step, use_ema)
    director = cls(loaded.config, loaded.params, loaded.tables, tok)
    director.step = loaded.step
    return director

  def mode(self, mode: str | None = None) -> str:
    """The layout this director draws: ``mode``, else ``config.inference.mode`` (``auto`` resolved)."""
    return director_layout.resolve_mode(self.config, mode)

  def check_settings(self, prefix: str = "config.inference.") -> None:
    """The sampling settings (after any ``--set``), before anything is compiled or sampled."""
    loading.check_settings(self.config, prefix)

  def apply_overrides(self, overrides: Sequence[str]) -> None:
    """``key=value`` items (the tools' ``--set``) onto ``config.inference``, typed like the
    default; then :meth:`check_settings`. Unknown keys and unparsable values name the item."""
    loading.apply_overrides(self.inf, overrides)
    self.check_settings(prefix="--set=")
    loading.warn_unguided(overrides, self.mode())

  def draw_keyframes(self, script: Script, *, seed: int = 0, mode: str | None = None,
                     earlier: Sequence[np.ndarray] = (), references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Keyframes for a given (validated) script, shots after ``earlier`` drawn: the image side of
    the director alone (evaluation with the true script, the overfit test)."""
    script_schema.validate(script)
    return self.keyframes.draw(script, jax.random.key(seed), self.mode(mode), earlier,
                               director_layout.checked_references(references))

  def direct(self, prompt: str, *, shots: int | None = None, seed: int = 0, mode: str | None = None,
             continue_from: Storyboard | None = None, references: Sequence[np.ndarray] = ()) -> Storyboard:
    """Writes a script for ``prompt`` and draws its keyframes (``shots`` bounds the length);
    ``references`` are images every part of the storyboard sees as context."""
    director_layout.check_request(prompt, shots)
    self.check_settings()
    references = director_layout.checked_references(references)
    prompt = prompt.strip()
    mode = self.mode(mode)
    self.layout.check_prompt_fits(prompt, len(references), int(self.inf.cache_capacity))
    try:
      return attempts.sample_storyboard(self.writer, self.keyframes, prompt, shots=shots, seed=seed, mode=mode,
                                        continue_from=continue_from, references=references)
    except CacheFullError as e:
      raise DirectorError(str(e)) from None
