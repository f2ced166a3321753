"""The director: prompt -> script (und expert, KV cache) -> one keyframe per shot (gen expert).

Two layouts, mirroring the training tasks (``data_pipelines/sequence_plan.py``):

* ``interleaved`` (stage-1 checkpoints): the model writes the header and the first frame line,
  then each keyframe is sampled right after its frame line and its clean latents join the
  context before the model writes the next video/frame lines.
* ``disentangled`` (stage-2 checkpoints): the und expert writes the whole script first
  (``[<Prompt> line] [rest of the script]``, the pre-context layout); then each keyframe k is
  drawn from ``[script] [clean keyframes 1..k-1] [<Framek> line] [noised image]`` with
  classifier-free guidance over three cache rows: full context, without text (keyframes only),
  without images (script only), exactly the conditions conditioning dropout trained.

Keyframes attend to earlier ones through their clean latents in the KV cache; a denoising step
recomputes only the image tokens. Continuation: an existing storyboard's script (and keyframes)
become the pre-context and the model writes further shots. Reference images (a character sheet,
a location photo) are encoded like context keyframes (``[ViT copy] [clean latents]``, the VAE
encoder on the real path) and put before everything else in the rows that see images, so the
script and every keyframe attend to them; the guidance row "without images" leaves them out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from unimage_jax import layout, pixel_codec, prompt_layout, script_schema
from unimage_jax.config_base import base_config
from unimage_jax.config_validation import ConfigError, validate_inference
from unimage_jax.errors import UserError
from unimage_jax.images import resize, vit_patches
from unimage_jax.inference import chunks, flow, schema_constraints
from unimage_jax.inference.engine import Engine, SamplingParams
from unimage_jax.inference.kv_cache import CacheFullError
from unimage_jax.inference.script_repair import UnrepairableScriptError, parse_or_repair
from unimage_jax.interchange import orbax_io
from unimage_jax.model import functional
from unimage_jax.script_schema import Script
from unimage_jax import tokenizer as tokenizer_lib
from unimage_jax.tokenizer import Tokenizer
from unimage_jax.vae import store

MODES = ("auto", "interleaved", "disentangled")
_DEFAULT_INFERENCE = base_config().inference  # settings a checkpoint saved before them can take by --set


class DirectorError(UserError, ValueError):
  """Bad prompt, checkpoint or settings; the message names what is wrong."""


@dataclasses.dataclass
class Storyboard:
  prompt: str
  script: Script  # validated (possibly repaired)
  keyframes: list[np.ndarray]  # uint8 [H, W, 3], one per shot
  raw_text: str  # what the model wrote
  repairs: list[str]  # empty when the raw text was already valid
  mode: str = "disentangled"
  seed: int = 0
  references: list[np.ndarray] = dataclasses.field(default_factory=list)  # uint8 [H, W, 3] context images


def _find_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The run's own copy (``tokenizer.model`` or ``tokenizer.json``, as the trainer wrote it), else
  ``config.data.tokenizer_path``."""
  own = os.path.join(workdir, tokenizer_lib.workdir_copy_name(config.data.tokenizer_path))
  for path in (own, config.data.tokenizer_path):
    if path and os.path.exists(tokenizer_lib.tokenizer_file(path)):
      return path
  raise DirectorError(f"no tokenizer: neither {own} nor config.data.tokenizer_path="
                      f"{config.data.tokenizer_path!r} exists")


def _load_vae(config: ml_collections.ConfigDict):
  """The config's VAE for decoding keyframes (and encoding continuation / reference images)."""
  try:
    vae = store.load_vae(config.model.vae_path)
    store.check_matches(vae.config, config.model, config.data.image_size)
  except UserError as e:
    raise DirectorError(str(e)) from None
  return vae


class Director:
  """Holds a model and its tokenizer; ``direct`` turns a prompt into a storyboard."""

  step: int | None = None  # the checkpoint step, when loaded from one

  def __init__(self, config: ml_collections.ConfigDict, params, tables, tokenizer: Tokenizer, vae=None):
    self.config = config
    self.inf = config.inference
    self.tok = tokenizer
    m = config.model
    self.engine = Engine(functional.model_def(m), params, tables, m)
    self.patch = m.latent_patch_size
    self.down = m.pixel_downsample if m.autoencoder == "pixel" else m.get("vae_downsample", 8)
    self.image_size = config.data.image_size
    self.grid = self.image_size // (self.down * self.patch)  # latent patches per side
    self.codec = None  # flux_vae: the VAE's jitted encoder/decoder; pixel: the exact codec
    if m.autoencoder == "flux_vae":
      self.codec = store.Codec(vae if vae is not None else _load_vae(config), self.patch, batch=1)
    elif m.autoencoder != "pixel":
      raise DirectorError(f"config.model.autoencoder={m.autoencoder!r} must be 'pixel' or 'flux_vae'")
    # understanding copies of context keyframes through the ViT, as the keyframe task trained them
    self.use_vit = bool(config.data.use_vit_context) and bool(m.vit.enabled)

  @classmethod
  def from_checkpoint(cls, workdir: str, *, step: int | None = None, use_ema: bool = True) -> "Director":
    """The newest step of ``workdir`` that reads completely (or exactly ``step``), with the config
    it was saved with; an unreadable newest step is reported and the previous one is used."""
    try:
      loaded = orbax_io.load_checkpoint(workdir, step, use_ema=use_ema)  # the readers' fallback
    except UserError as e:
      raise DirectorError(str(e)) from e
    config = loaded.config
    if "inference" not in config:
      from unimage_jax.config_base import base_config
      config.inference = base_config().inference
    try:
      tok = tokenizer_lib.load_tokenizer(_find_tokenizer(workdir, config), max_vocab_size=config.model.vocab_size)
    except ValueError as e:
      raise DirectorError(str(e)) from None
    director = cls(config, loaded.params, loaded.tables, tok)
    director.step = loaded.step
    return director

  # ------------------------------------------------------------------ helpers
  def _mode(self, mode: str | None) -> str:
    mode = mode or self.inf.mode
    if mode not in MODES:
      raise DirectorError(f"mode {mode!r} must be one of {MODES}")
    if mode == "auto":
      t = self.config.data.tasks
      return "disentangled" if float(t.get("keyframe", 0)) > 0 and float(t.get("script", 0)) > 0 else "interleaved"
    return mode

  def _text(self, lines: Sequence[str], close: bool = True) -> layout.TextSegment:
    return prompt_layout.text_segment(self.tok, prompt_layout.encode_lines(self.tok, lines), train=False, close=close)

  def _image_segment(self, tokens: np.ndarray, noised: bool) -> layout.ImageSegment:
    return prompt_layout.image_segment(self.tok, tokens, self.grid, self.grid, noised)

  def _encode(self, image: np.ndarray) -> np.ndarray:
    """uint8 image -> latent tokens ``[grid*grid, D]`` (the VAE encoder, or the pixel codec)."""
    image = resize(image, self.image_size)
    if self.codec is not None:
      return self.codec.encode(image[None])[0]
    tokens, _, _ = pixel_codec.image_to_tokens(image, self.down, self.patch)
    return tokens

  def _decode(self, tokens) -> np.ndarray:
    """Latent tokens -> uint8 image (the VAE decoder, or the pixel codec)."""
    if self.codec is not None:
      return self.codec.decode(np.asarray(tokens, np.float32)[None], self.grid, self.grid)[0]
    return pixel_codec.tokens_to_image(np.asarray(tokens), self.grid, self.grid, self.down, self.patch)

  def _context_image(self, image: np.ndarray, latents=None) -> list:
    """An earlier keyframe as context: its ViT copy (when the config reads images through the ViT)
    and its clean latents (``latents`` when just sampled, else encoded), the keyframe task's
    ``[ViT kf] [clean kf]``."""
    segs = []
    if self.use_vit:
      patches, h, w = vit_patches(resize(image, self.image_size), self.config.model.vit.patch_size)
      segs.append(prompt_layout.vit_segment(self.tok, patches, h, w))
    tokens = self._encode(image) if latents is None else latents
    return segs + [self._image_segment(tokens, False)]

  def _prefill_references(self, cache, references: Sequence[np.ndarray], rows: int):
    """Reference images as the first context of every row that sees images (rows 0 and 1 of the
    guidance triple; row 2 is "without images")."""
    for image in references:
      ctx = self._context_image(image)
      cache, _ = self.engine.prefill(cache, [ctx, ctx, []][:rows])
    return cache

  def check_settings(self, prefix: str = "config.inference.") -> None:
    """The sampling settings (after any ``--set``), before anything is compiled or sampled."""
    try:
      validate_inference(self.config, prefix)
    except ConfigError as e:
      raise DirectorError(str(e)) from None

  def apply_overrides(self, overrides: Sequence[str]) -> None:
    """``key=value`` items (the tools' ``--set``) onto ``config.inference``, typed like the
    default; then :meth:`check_settings`. Unknown keys and unparsable values name the item."""
    inference = self.inf
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
    self.check_settings(prefix="--set=")
    guidance = sorted({item.split("=", 1)[0] for item in overrides if item.startswith("cfg_")})
    if guidance and self._mode(None) == "interleaved":
      # only the keyframe task trains the rows without text / images (conditioning dropout); an
      # interleaved draw has no trained unconditional branch, so it samples unguided
      logging.warning("--set %s: classifier-free guidance applies to the disentangled layout only; this "
                      "director draws interleaved (config.inference.mode / its task mixture), unguided",
                      ", ".join(guidance))

  def _cache_room_error(self, used: int, what: str) -> DirectorError:
    cap = int(self.inf.cache_capacity)
    return DirectorError(f"config.inference.cache_capacity={cap} leaves no room for {what} after the first "
                         f"{used} slots (prompt and context; a keyframe takes {self.grid * self.grid + 2}); raise it "
                         "(tools/direct.py --set=cache_capacity=N) or shorten the prompt")

  def _sampling(self) -> SamplingParams:
    return SamplingParams(float(self.inf.temperature), int(self.inf.top_k), float(self.inf.top_p))

  def _guidance(self) -> flow.GuidanceParams:
    g = self.inf
    return flow.GuidanceParams(float(g.cfg_text_scale), float(g.cfg_img_scale), tuple(g.cfg_interval),
                               g.cfg_renorm_type, float(g.cfg_renorm_min))

  def _generate(self, cache, logits, rng, max_new: int, banned=None):
    """Samples one text segment (until ``<|im_end|>``); returns (cache, text, stopped)."""
    cache, tokens = self.engine.generate(cache, logits, rng, max_new=max_new, stop_ids=[self.tok.im_end],
                                         sampling=self._sampling(), banned=banned)
    ids = [int(t) for t in np.asarray(tokens[0]) if t >= 0]
    stopped = bool(ids) and ids[-1] == self.tok.im_end
    return cache, self.tok.decode([i for i in ids if i != self.tok.im_end]), stopped

  def _sample_keyframe(self, cache, rng, rows: int):
    noised = self._image_segment(np.zeros((self.grid * self.grid, self.engine.latent_dim), np.float32), True)
    chunk = chunks.chunk_from_segments([[noised]] * rows, cache, self.config.model)
    latents = self.engine.sample_image(cache, chunk, rng, num_steps=int(self.inf.num_steps),
                                       shift=float(self.inf.timestep_shift), guidance=self._guidance())
    return np.asarray(latents)

  # ------------------------------------------------------------------ the two layouts
  def _write_script(self, prompt: str, rng, context: Script | None, references: Sequence[np.ndarray] = ()):
    """Disentangled: the whole script in one text segment after the (pre-)context segment."""
    cache = self._prefill_references(self.engine.new_cache(1, int(self.inf.cache_capacity)), references, 1)
    if context is None:
      ctx_lines = [script_schema.prompt_line(prompt)]
    else:
      ctx = dataclasses.replace(context, prompt=prompt)
      ctx_lines = script_schema.render(ctx).splitlines()
    cache, logits = self.engine.prefill(cache, [[self._text(ctx_lines), self._text([], close=False)]])
    budget = int(self.inf.cache_capacity) - int(np.asarray(cache.length)[0]) - 1
    if budget < 16:
      raise self._cache_room_error(int(np.asarray(cache.length)[0]), "the script")
    cache, text, _ = self._generate(cache, logits, rng, min(int(self.inf.max_script_tokens), budget))
    return "\n".join(ctx_lines) + "\n" + text

  def _draw_disentangled(self, script: Script, rng, earlier: list[np.ndarray],
                         references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    guided = float(self.inf.cfg_text_scale) != 1.0 or float(self.inf.cfg_img_scale) != 1.0
    rows = 3 if guided else 1
    base = self._prefill_references(self.engine.new_cache(rows, int(self.inf.cache_capacity)), references, rows)
    script_text = self._text(script_schema.render(script).splitlines())
    # rows: full context, without text (keyframes only), without images (script only)
    base, _ = self.engine.prefill(base, [[script_text], [], [script_text]][:rows])
    images = list(earlier)
    for img in earlier:
      ctx_img = self._context_image(img)
      base, _ = self.engine.prefill(base, [ctx_img, ctx_img, []][:rows])
    for k in range(len(earlier) + 1, len(script.shots) + 1):
      frame = self._text([script_schema.frame_line(script, k)])
      ctx, _ = self.engine.prefill(base, [[frame], [], [frame]][:rows])
      rng, key = jax.random.split(rng)
      latents = self._sample_keyframe(ctx, key, rows)
      images.append(self._decode(latents))
      ctx_img = self._context_image(images[-1], latents)
      base, _ = self.engine.prefill(base, [ctx_img, ctx_img, []][:rows])
    return images

  def _draw_interleaved(self, script: Script, rng, earlier: list[np.ndarray],
                        references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Interleaved layout, teacher-forced: the script's own lines between the keyframes."""
    cache = self._prefill_references(self.engine.new_cache(1, int(self.inf.cache_capacity)), references, 1)
    n = len(script.shots)
    tail = lambda k: self._text(prompt_layout.tail_lines(script, k))
    cache, _ = self.engine.prefill(cache, [[self._text(prompt_layout.first_text_lines(script))]])
    images = list(earlier)
    for k, img in enumerate(earlier, start=1):
      cache, _ = self.engine.prefill(cache, [[self._image_segment(self._encode(img), False), tail(k)]])
    for k in range(len(earlier) + 1, n + 1):
      rng, key = jax.random.split(rng)
      latents = self._sample_keyframe(cache, key, 1)
      images.append(self._decode(latents))
      if k < n:
        cache, _ = self.engine.prefill(cache, [[self._image_segment(latents, False), tail(k)]])
    return images

  def draw_keyframes(self, script: Script, *, seed: int = 0, mode: str | None = None,
                     earlier: Sequence[np.ndarray] = (), references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Keyframes for a given (validated) script, shots after ``earlier`` drawn: the image side of
    the director alone (evaluation with the true script, the overfit test)."""
    script_schema.validate(script)
    draw = self._draw_disentangled if self._mode(mode) == "disentangled" else self._draw_interleaved
    return draw(script, jax.random.key(seed), list(earlier), self._checked_references(references))

  def _checked_references(self, references: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 RGB images, named by position when one is not."""
    out = []
    for i, image in enumerate(references):
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise DirectorError(f"reference image {i} must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
      out.append(image)
    return out

  def _direct_interleaved(self, prompt: str, rng, shots: int | None, context: Storyboard | None,
                          references: Sequence[np.ndarray] = ()):
    cap = int(self.inf.cache_capacity)
    cache = self._prefill_references(self.engine.new_cache(1, cap), references, 1)
    images: list[np.ndarray] = []
    if context is None:
      text = script_schema.prompt_line(prompt) + "\n"
      cache, logits = self.engine.prefill(cache, [[self._text([text.strip()], close=False)]])
    else:  # replay the existing story as context, then continue after its last video line
      old = dataclasses.replace(context.script, prompt=prompt)
      cache, _ = self.engine.prefill(cache, [[self._text(prompt_layout.first_text_lines(old))]])
      for k, img in enumerate(context.keyframes, start=1):
        clean = self._image_segment(self._encode(img), False)
        last = k == len(context.keyframes)
        tail = prompt_layout.tail_lines(old, k)[:1 if last else None]  # the last: its video line, still open
        cache, logits = self.engine.prefill(cache, [[clean, self._text(tail, close=not last)]])
        images.append(img)
      text = script_schema.render(old)
    while True:
      budget = cap - int(np.asarray(cache.length)[0]) - self.grid * self.grid - 8
      if budget <= 8:
        if not images and text.count("\n") <= 1:  # not even the first shot fits: say so, do not resample
          raise self._cache_room_error(int(np.asarray(cache.length)[0]), "a shot and its keyframe")
        break
      rng, key = jax.random.split(rng)
      banned = self._banned_after_keyframe(text, len(images) + 1) if images else None
      cache, chunk_text, stopped = self._generate(cache, logits, key, min(int(self.inf.max_chunk_tokens), budget),
                                                  banned)
      text += chunk_text
      k = len(images) + 1
      last_line = text.strip().splitlines()[-1] if text.strip() else ""
      wants_image = stopped and last_line.startswith(f"<Frame{k}>")
      if not wants_image or (shots is not None and k > shots):
        break
      rng, key = jax.random.split(rng)
      latents = self._sample_keyframe(cache, key, 1)
      images.append(self._decode(latents))
      # the schema allows only the <Videok> line after keyframe k: the director writes its tag (one
      # token in every tokenizer, as in a training row), as it writes the image markers; the model
      # writes the rest of the line
      tag = f"<Video{k}>"
      opened = prompt_layout.text_segment(self.tok, self.tok.encode(tag), train=False, close=False)
      cache, logits = self.engine.prefill(cache, [[self._image_segment(latents, False), opened]])
      text += tag
    return text, images

  # ------------------------------------------------------------------ public
  def direct(self, prompt: str, *, shots: int | None = None, seed: int = 0, mode: str | None = None,
             continue_from: Storyboard | None = None, references: Sequence[np.ndarray] = ()) -> Storyboard:
    """Writes a script for ``prompt`` and draws its keyframes (``shots`` bounds the length);
    ``references`` are images every part of the storyboard sees as context."""
    if not isinstance(prompt, str) or not prompt.strip():
      raise DirectorError("the prompt is empty")
    if "\n" in prompt or any(t in prompt for t in script_schema.CONTROL_TOKENS):
      raise DirectorError("the prompt must be one line without control tokens (<|im_start|> ...)")
    if shots is not None and shots < 1:
      raise DirectorError(f"--shots={shots} must be >= 1")
    self.check_settings()
    references = self._checked_references(references)
    prompt = prompt.strip()
    mode = self._mode(mode)
    prompt_tokens = len(self.tok.encode(script_schema.prompt_line(prompt))) + 2 + len(references) * self._context_slots()
    if prompt_tokens + self.grid * self.grid + 2 + 16 > int(self.inf.cache_capacity):
      raise DirectorError(f"the prompt is {prompt_tokens} tokens, too long for config.inference.cache_capacity="
                          f"{self.inf.cache_capacity} (which must also hold the script and a {self.grid * self.grid + 2}"
                          "-slot keyframe); shorten it or raise tools/direct.py --set=cache_capacity=N")
    n_old = len(continue_from.script.shots) if continue_from is not None else 0
    max_shots = None if shots is None else n_old + shots
    try:
      return self._attempts(prompt, seed, mode, continue_from, n_old, max_shots, references)
    except CacheFullError as e:
      raise DirectorError(str(e)) from None

  def _context_slots(self) -> int:
    """Cache slots one context image takes (its clean latents, plus the ViT copy if read)."""
    slots = self.grid * self.grid + 2
    if self.use_vit:
      side = self.image_size // self.config.model.vit.patch_size
      slots += side * side + 2
    return slots

  def _banned_after_keyframe(self, text: str, next_frame: int):
    """The ID tags the schema forbids once the header is written (None when switched off)."""
    if not bool(self.inf.get("schema_constrained", True)):
      return None
    characters, environments = schema_constraints.defined_counts(text)
    return schema_constraints.banned_after_keyframe(self.tok.special_ids, int(self.config.model.vocab_size),
                                                    characters, environments, next_frame)

  def _valid_attempts(self) -> int:
    return int(self.inf.get("valid_attempts", 1))  # checkpoints saved before the field: 1

  def _attempts(self, prompt: str, seed: int, mode: str, continue_from: Storyboard | None, n_old: int,
                max_shots: int | None, references: Sequence[np.ndarray] = ()) -> Storyboard:
    """Samples a script (with the next seed while it is unrepairable) and draws its keyframes.

    The first ``inference.valid_attempts`` samples look for a script that is valid as written: a
    repairable one is kept as the fallback and the next seed is tried (rejection sampling with the
    schema as the verifier; each repair throws away part of what the model wrote). The fallback is
    used once those attempts are spent; after that any repairable script is taken.
    """
    last_error, fallback = None, None
    for attempt in range(int(self.inf.max_attempts)):
      if fallback is not None and attempt >= self._valid_attempts():
        return fallback
      rng = jax.random.key(seed + 1000 * attempt)
      if mode == "disentangled":
        context = continue_from.script if continue_from is not None else None
        raw = self._write_script(prompt, rng, context, references)
      else:
        raw, images = self._direct_interleaved(prompt, rng, max_shots, continue_from, references)
      try:
        script, repairs = parse_or_repair(raw, prompt, max_shots)
      except UnrepairableScriptError as e:
        last_error = e
        continue
      if mode == "interleaved" and not images:
        last_error = UnrepairableScriptError("the model asked for no keyframe")
        continue
      if continue_from is not None and len(script.shots) <= n_old:
        last_error = UnrepairableScriptError("the model wrote no new shot")
        continue
      needs_repair = bool(repairs)
      if needs_repair and fallback is not None:
        continue  # the first repairable script stays the fallback
      if attempt:
        repairs = [f"resampled {attempt} time(s): {last_error}"] + repairs
      if mode == "disentangled":
        earlier = continue_from.keyframes if continue_from is not None else []
        images = self._draw_disentangled(script, jax.random.fold_in(rng, 1), earlier, references)
      elif len(images) < len(script.shots):  # a repaired script may keep a shot whose image was not drawn
        script = dataclasses.replace(script, shots=script.shots[:len(images)])
        repairs.append(f"kept the {len(images)} shots that have keyframes")
      images = images[:len(script.shots)]
      board = Storyboard(prompt, script, images, raw, repairs, mode, seed, list(references))
      if not needs_repair or attempt + 1 >= self._valid_attempts():
        return board
      fallback, last_error = board, UnrepairableScriptError(f"attempt {attempt + 1} needed repairs: {repairs}")
    if fallback is not None:
      return fallback
    raise DirectorError(f"no valid script after {self.inf.max_attempts} attempts: {last_error}")
