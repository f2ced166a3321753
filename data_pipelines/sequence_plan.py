"""Task plans (docs/ARCHITECTURE.md §4): how one story becomes one training sample (a segment list).

Layouts (every text segment is ``<|im_start|> ... <|im_end|>`` so the model learns to stop; each
image is wrapped by ``<|vision_start|>``/``<|vision_end|>`` markers written by the packer):

* ``interleaved`` (stage 1): [text: header + Frame1] [noised kf1] [clean kf1]
  [text: Video1 + Frame2] [noised kf2] [clean kf2] ... [text: VideoK]; all text trains, every
  noised image trains. Stories too long for the row keep their first shots (cut at a shot
  boundary, so the sample stays a valid script prefix; a cut text ends with the next Frame line,
  never with a false end of script).

Every plan returns *variants*, longest first, all fitting a row alone: shorter cuts the packer may
use to fill a row's tail (``packing.FirstFitPacker``). A cut script continuation carries no
``<|im_end|>`` so the model is never taught to stop early.
* ``script`` (stage 2, und expert): text only. With ``precontext_split_prob`` the script is cut at
  a random shot boundary c: [header + shots 1..c] (context, no loss) [shots c+1..K] (trained), so
  the model learns to continue a script; otherwise [prompt] (context) [rest] (trained).
* ``keyframe`` (stage 2, gen expert), the director's inference layout: [script text (no loss)]
  ([ViT kf1]) [clean kf1] ... ([ViT kf(k-1)]) [clean kf(k-1)] [text: Framek line (no loss)]
  [noised kf k]. The short Framek text names the target shot, so the sample stays well defined
  when the earlier keyframes are dropped; ViT copies appear with ``use_vit_context``.
  Conditioning dropout for classifier-free guidance: ``text_cond_dropout`` drops both text
  segments, ``vae_cond_dropout`` drops the earlier clean keyframes, ``vit_cond_dropout`` their
  ViT copies. Dropout applies only here: in the interleaved task every segment is also a target.
* ``header`` (stage 1, und expert, a few dozen slots): the first text segment of the interleaved
  layout alone, [text: header + Frame1], without the images (its ``<|im_end|>`` means "draw the
  first keyframe" there, as in the interleaved sample, not the end of the script). Copying
  the prompt's names and places into the ``<CharacterN>`` / ``<EnvironmentN>`` lines is a small
  share of a story's tokens; at weight 1.0 these samples give it 1.5x the examples per step for
  13% of the gen slots (README, "Diagnosing the keyframes").
* ``opening`` (stage 1): that first text (trained) and the noised copies of keyframe 1.
* ``subject`` (stage 1, gen expert): [header + the frame line of a single-character shot (no
  loss)] [its noised copies]; ``data.subject_alone`` is the share that keep only the subject's
  cast line, ``data.subject_spelled_out`` the share whose frame line spells the subject out.

With ``data.keyframe_caption`` every noised keyframe (all tasks) follows a no-loss text of the
definition lines of what its frame line names (``prompt_layout.caption_lines``), which the
director writes before each keyframe it draws. With ``data.character_loss_weight`` (StoryWorld) a
noised keyframe's tokens carry flow-loss weights from the share of their pixels a character paints.

Text lines are encoded one by one (``line + "\\n"``) so a prefix of a script always has the same
tokens as the whole script's prefix; the director encodes the same way (``unimage_jax/prompt_layout.py``
holds the layout both use).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from data_pipelines.storyworld import cast as storyworld_cast
from unimage_jax import layout, prompt_layout
from unimage_jax.choices import AUTOENCODERS
from unimage_jax.config_validation import ConfigError
from unimage_jax.errors import UserError
from unimage_jax.images import resize, vit_patches
from unimage_jax.layout import BufferSizes, ImageSegment, TextSegment, VitSegment
from unimage_jax.pixel_codec import image_to_tokens
from unimage_jax.script_schema import Script, frame_line, header_lines, prompt_line, referenced, video_line
from unimage_jax.tokenizer import Tokenizer

TASKS = ("interleaved", "script", "keyframe", "header", "opening", "subject")


class SampleTooLargeError(UserError, ValueError):
  """Even the smallest plan of a story does not fit one row."""


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """What the planner needs from ``config`` (kept small and picklable for worker processes)."""

  sizes: BufferSizes
  image_size: int
  autoencoder: str  # "pixel": encode here with the exact codec; "flux_vae": records carry cached latents
  pixel_downsample: int
  latent_patch_size: int
  latent_grid: int
  vit_patch_size: int
  vit_enabled: bool
  task_weights: tuple[tuple[str, float], ...]
  precontext_split_prob: float
  text_cond_dropout: float
  vit_cond_dropout: float
  vae_cond_dropout: float
  use_vit_context: bool
  noised_copies: int = 1  # interleaved task: noised copies per keyframe (independent t and noise)
  subject_alone: float = 0.0  # subject task: probability of keeping only the subject's cast line
  name_loss_weight: float = 1.0  # loss weight of the labels that are a cast line's name tokens
  subject_spelled_out: float = 0.0  # subject task: probability of the frame line spelling the subject out
  place_change_copies: int = 0  # interleaved task: noised copies of a keyframe whose place changes (0: noised_copies)
  keyframe_caption: str = "none"  # the no-loss text before each noised keyframe (prompt_layout.caption_lines)
  character_loss_weight: float = 1.0  # flow-loss weight of a noised keyframe's character pixels (StoryWorld)

  @classmethod
  def from_config(cls, config) -> "PlanConfig":
    d, m = config.data, config.model
    if m.autoencoder == "pixel" and m.latent_channels != 3 * m.pixel_downsample ** 2:
      raise ConfigError(f"config.model.latent_channels={m.latent_channels} must be 3 * pixel_downsample**2 = "
                        f"{3 * m.pixel_downsample ** 2} for the pixel codec")
    if m.autoencoder not in AUTOENCODERS:
      raise ConfigError(f"config.model.autoencoder={m.autoencoder!r} must be {' or '.join(map(repr, AUTOENCODERS))}")
    for share in ("subject_alone", "subject_spelled_out"):
      if not 0.0 <= float(d.get(share, 0.0)) <= 1.0:
        raise ConfigError(f"config.data.{share}={d.get(share)} must be a share in [0, 1]")
    if int(d.get("place_change_copies", 0)) < 0:
      raise ConfigError(f"config.data.place_change_copies={d.place_change_copies} must be >= 0 (0: data.noised_copies)")
    if not float(d.get("character_loss_weight", 1.0)) > 0.0:
      raise ConfigError(f"config.data.character_loss_weight={d.character_loss_weight} must be > 0")
    if float(d.get("character_loss_weight", 1.0)) != 1.0 and d.dataset != "storyworld":
      raise ConfigError(f"config.data.character_loss_weight={d.character_loss_weight} needs StoryWorld renders "
                        f"(their character colours mark the pixels); config.data.dataset={d.dataset!r}")
    if not float(d.get("name_loss_weight", 1.0)) > 0.0:
      raise ConfigError(f"config.data.name_loss_weight={d.name_loss_weight} must be > 0")
    weights = tuple((t, float(d.tasks[t])) for t in TASKS if t in d.tasks and float(d.tasks[t]) > 0)
    unknown = set(d.tasks.keys()) - set(TASKS)
    if unknown or not weights:
      raise ValueError(f"config.data.tasks must weight some of {TASKS}; got {dict(d.tasks)}")
    return cls(
        sizes=BufferSizes(d.und_len, d.gen_len, d.vit_len, d.max_segments),
        image_size=d.image_size, autoencoder=m.autoencoder, pixel_downsample=m.pixel_downsample,
        latent_patch_size=m.latent_patch_size, latent_grid=m.max_latent_grid,
        vit_patch_size=m.vit.patch_size, vit_enabled=bool(m.vit.enabled), task_weights=weights,
        precontext_split_prob=d.precontext_split_prob, text_cond_dropout=d.text_cond_dropout,
        vit_cond_dropout=d.vit_cond_dropout, vae_cond_dropout=d.vae_cond_dropout,
        use_vit_context=bool(d.use_vit_context), noised_copies=int(d.noised_copies),
        subject_alone=float(d.get("subject_alone", 0.0)),
        name_loss_weight=float(d.get("name_loss_weight", 1.0)),
        subject_spelled_out=float(d.get("subject_spelled_out", 0.0)),
        place_change_copies=int(d.get("place_change_copies", 0)),
        keyframe_caption=str(d.get("keyframe_caption", "none")),
        character_loss_weight=float(d.get("character_loss_weight", 1.0)),
    )


@dataclasses.dataclass(frozen=True)
class CachedFrame:
  """A keyframe whose VAE latents come from the latent cache (``latent_cache.py``)."""

  tokens: np.ndarray  # [h*w, D] BAGEL-patchified, FLUX-normalised latents
  h: int
  w: int
  pixels: np.ndarray  # uint8 [H, W, 3], for the ViT copy


def frames_of(record: dict[str, Any], autoencoder: str) -> list:
  """The record's keyframes as the planner takes them: images, or :class:`CachedFrame` for a VAE."""
  if autoencoder == "pixel":
    return record["keyframes"]
  if "latents" not in record:
    raise ConfigError("config.model.autoencoder='flux_vae' needs records with cached latents "
                      "(data_pipelines.latent_cache; tools/cache_latents.py)")
  lat = record["latents"]
  return [CachedFrame(np.asarray(t, np.float32), int(lat["h"]), int(lat["w"]), px)
          for t, px in zip(lat["tokens"], record["keyframes"])]


@dataclasses.dataclass
class Sample:
  """One planned sample: layout variants, longest (preferred) first, each fitting a row alone.

  Shorter variants are cut at a shot boundary (or drop the oldest context); the packer may take
  one to fill the tail of a row instead of leaving it as padding (see ``packing.py``).
  """

  task: str
  story_id: str
  variants: list[list[layout.Segment]]

  @property
  def segments(self) -> list[layout.Segment]:
    return self.variants[0]

  def lengths(self) -> tuple[int, int, int, int]:
    return layout.sample_lengths(self.segments)


def _fits(segments: Sequence[layout.Segment], sizes: BufferSizes) -> bool:
  u, g, v, s = layout.sample_lengths(segments)
  return u <= sizes.und_len and g <= sizes.gen_len and v <= sizes.vit_len and s <= sizes.max_segments


class Planner:
  """Turns a decoded record into a :class:`Sample` for a task drawn from the mixture."""

  def __init__(self, cfg: PlanConfig, tokenizer: Tokenizer):
    self.cfg = cfg
    self.tok = tokenizer
    self._cache: dict[str, list[int]] = {}

  # ------------------------------------------------------------------ building blocks
  def _ids(self, line: str) -> list[int]:
    if line not in self._cache:  # a story's lines recur across variants: encode each once
      self._cache[line] = prompt_layout.line_ids(self.tok, line)
    return self._cache[line]

  def _text(self, lines: Sequence[str], train: bool, close: bool = True) -> TextSegment:
    """``<|im_start|> lines [<|im_end|>]``; ``close=False`` for a cut-off text (no false stop)."""
    ids = [i for line in lines for i in self._ids(line)]
    seg = prompt_layout.text_segment(self.tok, ids, train=train, close=close)
    if train and self.cfg.name_loss_weight != 1.0:
      seg.label_weights = self._name_label_weights(lines, len(seg.token_ids))
    return seg

  def _name_label_weights(self, lines: Sequence[str], n: int) -> np.ndarray:
    """[n] label weights: ``name_loss_weight`` where the next token is a cast line's name.

    Why: copying the prompt's K-th name into ``<CharacterK>:`` is a few tokens of a long text, so
    its circuit is slow to form under a uniform cross-entropy (README, "Diagnosing the keyframes").
    """
    weights = np.ones(n, np.float32)
    start = 1  # after <|im_start|>
    for line in lines:
      ids = self._ids(line)
      span = prompt_layout.name_token_span(self.tok, line, ids)
      if span is not None:  # the label of position i is token i + 1
        weights[start + span[0] - 1:start + span[1] - 1] = self.cfg.name_loss_weight
      start += len(ids)
    return weights

  def _image(self, frame, noised: bool) -> ImageSegment:
    c = self.cfg
    if isinstance(frame, CachedFrame):
      tokens, h, w = frame.tokens, frame.h, frame.w
    else:
      tokens, h, w = image_to_tokens(resize(frame, c.image_size), c.pixel_downsample, c.latent_patch_size)
    seg = prompt_layout.image_segment(self.tok, tokens, h, w, noised)  # [h*w, D]
    if noised and c.character_loss_weight != 1.0:
      seg.loss_weights = self._character_weights(frame, h, w)
    return seg

  def _character_weights(self, frame, h: int, w: int) -> np.ndarray:
    """[h*w] flow-loss weights: ``1 + (W - 1) * share of the token's pixels a character paints``,
    the token-level mean of weighing each character pixel W (``data.character_loss_weight``).

    Why: the places fill most pixels, so once they are drawn the flow loss pays little for the
    characters, and no run drew one (README, "Diagnosing the keyframes"); as the name weight made
    the names' copy form, this makes the pixels that only the cast lines explain weigh more.
    """
    pixels = frame.pixels if isinstance(frame, CachedFrame) else resize(frame, self.cfg.image_size)
    mask = storyworld_cast.character_mask(pixels)  # [S, S]
    s = mask.shape[0]
    share = mask.reshape(h, s // h, w, s // w).mean(axis=(1, 3))  # [h, w]
    return (1.0 + (self.cfg.character_loss_weight - 1.0) * share).reshape(-1).astype(np.float32)

  def _caption(self, script: Script, k: int) -> list[layout.Segment]:
    """``[caption of shot k]`` (no loss; ``data.keyframe_caption``), or nothing: the segment the
    director writes before keyframe k (``prompt_layout.caption_lines``)."""
    lines = prompt_layout.caption_lines(header_lines(script), frame_line(script, k), self.cfg.keyframe_caption)
    return [self._text(lines, False)] if lines else []

  def _vit(self, frame) -> VitSegment:
    image = frame.pixels if isinstance(frame, CachedFrame) else frame
    patches, h, w = vit_patches(resize(image, self.cfg.image_size), self.cfg.vit_patch_size)
    return prompt_layout.vit_segment(self.tok, patches, h, w)

  def _fitting(self, candidates, what: str) -> list[list[layout.Segment]]:
    """Keeps the candidate layouts (longest first) that fit a row alone; at least one must."""
    out = [segs for segs in candidates if _fits(segs, self.cfg.sizes)]
    if not out:
      raise SampleTooLargeError(f"{what} does not fit the row {self.cfg.sizes}")
    return out

  # ------------------------------------------------------------------ tasks
  def plan(self, record: dict[str, Any], rng: np.random.Generator, task: str | None = None) -> Sample:
    if task is None:
      names, weights = zip(*self.cfg.task_weights)
      p = np.asarray(weights) / np.sum(weights)
      task = names[int(rng.choice(len(names), p=p))]
    script: Script = record["script"]
    frames = frames_of(record, self.cfg.autoencoder)
    if task not in ("script", "header") and len(frames) != len(script.shots):
      raise ValueError(f"story {record['story_id']}: {len(frames)} keyframes for {len(script.shots)} shots")
    self._cache: dict[str, list[int]] = {}
    build = {"interleaved": self.interleaved, "script": self.script, "keyframe": self.keyframe,
             "header": self.header, "opening": self.opening, "subject": self.subject}[task]
    return Sample(task, record["story_id"], build(script, frames, rng))

  def interleaved(self, script: Script, frames: list[np.ndarray], rng: np.random.Generator):
    """Variants: the first n shots, n = K .. 1, each with or without the text after image n.
    Each keyframe is ``data.noised_copies`` noised copies, then the clean one the later shots see.
    A cut story's last text ends with the next ``<Frame>`` line (as everywhere before an image),
    so a cut never teaches a false stop; finer cut points let the packer fill row tails."""
    del rng
    # extra noised copies share the first one's position and see the same context, and nothing
    # sees them: more flow-loss samples per keyframe for a few gen slots and no extra text
    copies = [self.cfg.noised_copies] * len(frames)
    if self.cfg.place_change_copies:  # the shots that the previous keyframe's place would get wrong
      places = [tuple(referenced(shot.frame, "Environment")) for shot in script.shots]
      copies = [self.cfg.place_change_copies if k and places[k] != places[k - 1] else c for k, c in enumerate(copies)]
    images = [(*self._caption(script, k), *(self._image(f, True),) * n, self._image(f, False))
              for k, (f, n) in enumerate(zip(frames, copies), start=1)]
    n_shots = len(script.shots)

    def prefix(n: int, with_tail: bool) -> list[layout.Segment]:
      segs: list[layout.Segment] = [self._first_text(script)]
      for k in range(1, n + 1):
        segs += list(images[k - 1])
        if k < n or with_tail:
          segs.append(self._text(prompt_layout.tail_lines(script, k), True))
      return segs

    candidates = (prefix(n, tail) for n in range(n_shots, 0, -1) for tail in (True, False))
    return self._fitting(candidates, f"the first shot of {script.prompt[:40]!r} (text + 2 images)")

  def _first_text(self, script: Script) -> TextSegment:
    """[prompt, cast, places, <Frame1>] closed by the ``<|im_end|>`` that asks for keyframe 1."""
    return self._text(prompt_layout.first_text_lines(script), True)

  def header(self, script: Script, frames, rng: np.random.Generator):
    """The interleaved layout's first text (trained), without the images."""
    del frames, rng
    return self._fitting([[self._first_text(script)]], f"the header of {script.prompt[:40]!r}")

  def opening(self, script: Script, frames, rng: np.random.Generator):
    """The interleaved layout's first text (trained) and the noised copies of keyframe 1 (no
    clean copy: nothing would see it). The opening shot is fully determined by the header and
    its frame line, so these short samples teach the image tokens to read the cast and place
    lines without the history that later shots also need."""
    del rng  # plan() checked one keyframe per shot, and a valid script has a shot
    segs = [self._first_text(script), *self._caption(script, 1)] + [self._image(frames[0], True)] * self.cfg.noised_copies
    return self._fitting([segs], f"the opening shot of {script.prompt[:40]!r}")

  def subject(self, script: Script, frames, rng: np.random.Generator):
    """[header + the frame line of one shot (context, no loss)] [its noised copies]: a shot whose
    frame line names one character (a medium shot or close-up in StoryWorld), drawn at random.
    Its picture is the named subject in the middle of the frame, which only the subject's
    character line can say: with no earlier keyframe to copy, the image tokens must resolve the
    frame line's ``<CharacterK>`` through the K-th cast line (README, "Diagnosing the keyframes")."""
    single = [k for k, shot in enumerate(script.shots, start=1) if len(referenced(shot.frame, "Character")) == 1]
    k = int(rng.choice(single)) if single else int(rng.integers(1, len(script.shots) + 1))
    header = header_lines(script)
    cast = referenced(script.shots[k - 1].frame, "Character")
    if cast and rng.random() < self.cfg.subject_alone:  # only the subject's own cast line: its look is the one description
      own = f"<Character{cast[0]}>:"
      header = [line for line in header if not line.startswith("<Character") or line.startswith(own)]
    spelled = self.cfg.subject_spelled_out > 0 and rng.random() < self.cfg.subject_spelled_out
    line = prompt_layout.spelled_out_frame_line(script, k) if spelled else frame_line(script, k)
    segs = [self._text(header + [line], False), *self._caption(script, k)]
    segs += [self._image(frames[k - 1], True)] * self.cfg.noised_copies
    return self._fitting([segs], f"shot {k} of {script.prompt[:40]!r} after the header")

  def script(self, script: Script, frames, rng: np.random.Generator):
    """Variants: the continuation cut after shot ``end``, end = K .. first continued shot."""
    del frames
    n_shots = len(script.shots)
    shot_lines = lambda a, b: sum(([frame_line(script, k), video_line(script, k)] for k in range(a, b + 1)), [])
    context, start = [prompt_line(script.prompt)], 1
    rest_header = header_lines(script)[1:]
    if n_shots >= 2 and rng.random() < self.cfg.precontext_split_prob:
      cut = int(rng.integers(1, n_shots))
      while cut >= 1:  # the context must leave room for at least one continued shot
        ctx = header_lines(script) + shot_lines(1, cut)
        if _fits([self._text(ctx, False), self._text(shot_lines(cut + 1, cut + 1), True)], self.cfg.sizes):
          context, start, rest_header = ctx, cut + 1, []
          break
        cut -= 1
    ctx_seg = self._text(context, False)
    candidates = ([ctx_seg, self._text(rest_header + shot_lines(start, end), True, close=end == n_shots)]
                  for end in range(n_shots, start - 1, -1))
    return self._fitting(candidates, f"the script context of {script.prompt[:40]!r}")

  def keyframe(self, script: Script, frames: list[np.ndarray], rng: np.random.Generator):
    """Variants drop context in this order: script lines after the target shot, the oldest
    context keyframes, then script lines before it (the target and its frame line stay)."""
    c = self.cfg
    k = int(rng.integers(1, len(script.shots) + 1))
    drop_text = rng.random() < c.text_cond_dropout
    drop_vae = rng.random() < c.vae_cond_dropout
    use_vit = c.use_vit_context and c.vit_enabled and not rng.random() < c.vit_cond_dropout
    target = self._image(frames[k - 1], True)
    earlier = []
    for j in range(k - 1):
      pair = ([self._vit(frames[j])] if use_vit else []) + ([] if drop_vae else [self._image(frames[j], False)])
      earlier.append(pair)
    n_script = len(script.shots)

    def layout_for(n_script: int, earlier: list) -> list[layout.Segment]:
      segs: list[layout.Segment] = []
      if not drop_text:
        lines = header_lines(script) + sum(([frame_line(script, j), video_line(script, j)]
                                            for j in range(1, n_script + 1)), [])
        segs.append(self._text(lines, False))
      for pair in earlier:
        segs += pair
      if not drop_text:
        segs += [self._text([frame_line(script, k)], False), *self._caption(script, k)]
      segs.append(target)
      return segs

    def candidates():
      n, e = n_script, list(earlier)
      while True:
        yield layout_for(n, e)
        if n > k and not drop_text:
          n -= 1
        elif e:
          e.pop(0)
        elif n > 1 and not drop_text:
          n -= 1
        else:
          return

    return self._fitting(candidates(), f"keyframe {k} of {script.prompt[:40]!r}")
