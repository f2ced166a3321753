"""The director's side of the segment layout (``unimage_jax/prompt_layout.py``): which layout it
draws, what a prompt may be, and the segments and cache slots of its text, keyframes and context
images, as the planner lays them out in training."""

from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np

from unimage_jax import layout, prompt_layout, script_schema
from unimage_jax.choices import KEYFRAME_CAPTIONS
from unimage_jax.config_validation import INFERENCE_MODES, image_tokens
from unimage_jax.images import resize, vit_patches
from unimage_jax.inference.image_codec import ImageCodec
from unimage_jax.inference.storyboard import DirectorError


def resolve_mode(config: ml_collections.ConfigDict, mode: str | None) -> str:
  """``mode`` (else ``config.inference.mode``); ``auto``: disentangled when the checkpoint trained
  both stage-2 tasks, interleaved otherwise."""
  mode = mode or config.inference.mode
  if mode not in INFERENCE_MODES:
    raise DirectorError(f"mode {mode!r} must be one of {INFERENCE_MODES}")
  if mode == "auto":
    t = config.data.tasks
    return "disentangled" if float(t.get("keyframe", 0)) > 0 and float(t.get("script", 0)) > 0 else "interleaved"
  return mode


def check_request(prompt: str, shots: int | None) -> None:
  """The prompt becomes the ``<Prompt>`` line: one non-empty line without control tokens."""
  if not isinstance(prompt, str) or not prompt.strip():
    raise DirectorError("the prompt is empty")
  if "\n" in prompt or any(t in prompt for t in script_schema.CONTROL_TOKENS):
    raise DirectorError("the prompt must be one line without control tokens (<|im_start|> ...)")
  if shots is not None and shots < 1:
    raise DirectorError(f"--shots={shots} must be >= 1")


def checked_references(references: Sequence[np.ndarray]) -> list[np.ndarray]:
  """uint8 RGB images, named by position when one is not."""
  out = []
  for i, image in enumerate(references):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DirectorError(f"reference image {i} must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    out.append(image)
  return out


class DirectorLayout:
  """Segments of one director's model: its tokenizer's markers, its codec's grid, its ViT."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, codec: ImageCodec):
    self.tok, self.codec = tokenizer, codec
    self.grid = codec.grid  # latent patches per side
    self.keyframe_slots = image_tokens(config)  # latents + the two markers
    self.image_size = config.data.image_size
    # understanding copies of context keyframes through the ViT, as the keyframe task trained them
    self.use_vit = bool(config.data.use_vit_context) and bool(config.model.vit.enabled)
    self.vit_patch = config.model.vit.patch_size if self.use_vit else None
    # the keyframe caption the planner put before every noised keyframe (data.keyframe_caption)
    self.caption_kind = str(config.data.get("keyframe_caption", "none"))
    if self.caption_kind not in KEYFRAME_CAPTIONS:
      raise DirectorError(f"config.data.keyframe_caption={self.caption_kind!r} must be one of {KEYFRAME_CAPTIONS}")

  def text(self, lines: Sequence[str], close: bool = True) -> layout.TextSegment:
    """Script lines as a context text (no loss at inference); ``close=False`` leaves it open."""
    return prompt_layout.text_segment(self.tok, prompt_layout.encode_lines(self.tok, lines), train=False, close=close)

  def caption(self, lines: Sequence[str], frame: str) -> list[layout.Segment]:
    """The keyframe caption before a keyframe whose frame line is ``frame``, as the planner lays it
    out: the definition lines among ``lines`` (the script written so far) of what ``frame`` names
    (``prompt_layout.caption_lines``); nothing when the checkpoint trained without captions or the
    frame names nothing defined."""
    found = prompt_layout.caption_lines(lines, frame, self.caption_kind)
    return [self.text(found)] if found else []

  def caption_room(self, lines: Sequence[str]) -> int:
    """Cache slots the longest caption a frame line could get from ``lines`` takes (0 without
    captions): what the director keeps free for it when it decides whether a shot still fits."""
    if self.caption_kind == "none":
      return 0
    sizes = lambda kind: [len(prompt_layout.line_ids(self.tok, line))
                          for line in prompt_layout.definitions(lines, kind).values()]
    places, cast = sizes("Environment"), sizes("Character")
    room = max(places, default=0)
    if self.caption_kind == "subject_place":
      room += max(cast, default=0)
    elif self.caption_kind == "cast_place":
      room += sum(cast)
    return room + 2  # <|im_start|> ... <|im_end|>

  def opened_tag(self, tag: str) -> layout.TextSegment:
    """``<|im_start|> <tag>``: a text the director starts and the model goes on writing."""
    return prompt_layout.text_segment(self.tok, self.tok.encode(tag), train=False, close=False)

  def image(self, tokens: np.ndarray, noised: bool) -> layout.ImageSegment:
    return prompt_layout.image_segment(self.tok, tokens, self.grid, self.grid, noised)  # tokens: [grid*grid, D]

  def noised_image(self, latent_dim: int) -> layout.ImageSegment:
    """The placeholder of a keyframe being sampled (the sampler writes its noise)."""
    return self.image(np.zeros((self.grid * self.grid, latent_dim), np.float32), True)

  def context_image(self, image: np.ndarray, latents=None) -> list[layout.Segment]:
    """An earlier keyframe (or a reference image) as context: its ViT copy (when the config reads
    images through the ViT) and its clean latents (``latents`` when just sampled, else encoded),
    the keyframe task's ``[ViT kf] [clean kf]``."""
    segs: list[layout.Segment] = []
    if self.use_vit:
      patches, h, w = vit_patches(resize(image, self.image_size), self.vit_patch)
      segs.append(prompt_layout.vit_segment(self.tok, patches, h, w))
    tokens = self.codec.encode(image) if latents is None else latents
    return segs + [self.image(tokens, False)]

  def context_slots(self) -> int:
    """Cache slots one context image takes (its clean latents, plus the ViT copy if read)."""
    slots = self.keyframe_slots
    if self.use_vit:
      side = self.image_size // self.vit_patch
      slots += side * side + 2
    return slots

  def check_prompt_fits(self, prompt: str, references: int, capacity: int) -> None:
    """The prompt's text and the reference images before it leave room for a keyframe and a
    little script in a cache of ``capacity`` slots."""
    prompt_tokens = len(self.tok.encode(script_schema.prompt_line(prompt))) + 2 + references * self.context_slots()
    if prompt_tokens + self.keyframe_slots + 16 > capacity:
      raise DirectorError(f"the prompt is {prompt_tokens} tokens, too long for config.inference.cache_capacity="
                          f"{capacity} (which must also hold the script and a {self.keyframe_slots}"
                          "-slot keyframe); shorten it or raise tools/direct.py --set=cache_capacity=N")
