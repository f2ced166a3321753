"""The und expert writes the script: whole (disentangled), or chunk by chunk between the keyframes
it asks for (interleaved), constrained to the tags the schema allows.

* ``disentangled``: ``[<Prompt> line] [rest of the script]``, the script task's pre-context layout;
  a continuation puts the existing script where the prompt line stands.
* ``interleaved``: the model writes the header and the first frame line; each keyframe is sampled
  right after its frame line and its clean latents join the context before the model writes the
  next video/frame lines. A continuation replays the existing storyboard first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import ml_collections
import numpy as np

from unimage_jax import prompt_layout, script_schema
from unimage_jax.inference import schema_constraints
from unimage_jax.inference.director_layout import DirectorLayout
from unimage_jax.inference.engine import Engine, SamplingParams
from unimage_jax.inference.keyframe_drawing import KeyframeDrawer
from unimage_jax.inference.storyboard import DirectorError, Storyboard
from unimage_jax.script_schema import Script


class ScriptWriter:
  """Samples script text with one engine; draws the interleaved keyframes with ``keyframes``."""

  def __init__(self, engine: Engine, layout: DirectorLayout, keyframes: KeyframeDrawer,
               config: ml_collections.ConfigDict):
    self.engine, self.layout, self.keyframes = engine, layout, keyframes
    self.tok = layout.tok
    self.inf = config.inference  # read at each call: --set may change it
    self.vocab_size = int(config.model.vocab_size)

  def cache_room_error(self, used: int, what: str) -> DirectorError:
    cap = int(self.inf.cache_capacity)
    return DirectorError(f"config.inference.cache_capacity={cap} leaves no room for {what} after the first "
                         f"{used} slots (prompt and context; a keyframe takes {self.layout.keyframe_slots}); raise it "
                         "(tools/direct.py --set=cache_capacity=N) or shorten the prompt")

  def sampling(self) -> SamplingParams:
    return SamplingParams(float(self.inf.temperature), int(self.inf.top_k), float(self.inf.top_p))

  def generate(self, cache, logits, rng, max_new: int, banned=None):
    """Samples one text segment (until ``<|im_end|>``); returns (cache, text, stopped)."""
    cache, tokens = self.engine.generate(cache, logits, rng, max_new=max_new, stop_ids=[self.tok.im_end],
                                         sampling=self.sampling(), banned=banned)
    ids = [int(t) for t in np.asarray(tokens[0]) if t >= 0]
    stopped = bool(ids) and ids[-1] == self.tok.im_end
    return cache, self.tok.decode([i for i in ids if i != self.tok.im_end]), stopped

  def banned_after_keyframe(self, text: str, next_frame: int):
    """The ID tags the schema forbids once the header is written (None when switched off)."""
    if not bool(self.inf.get("schema_constrained", True)):
      return None
    characters, environments = schema_constraints.defined_counts(text)
    return schema_constraints.banned_after_keyframe(self.tok.special_ids, self.vocab_size, characters,
                                                    environments, next_frame)

  def write_script(self, prompt: str, rng, context: Script | None, references: Sequence[np.ndarray] = ()) -> str:
    """Disentangled: the whole script in one text segment after the (pre-)context segment."""
    seg = self.layout
    cache = self.keyframes.fresh_cache(references, 1)
    if context is None:
      ctx_lines = [script_schema.prompt_line(prompt)]
    else:
      ctx = dataclasses.replace(context, prompt=prompt)
      ctx_lines = script_schema.render(ctx).splitlines()
    cache, logits = self.engine.prefill(cache, [[seg.text(ctx_lines), seg.text([], close=False)]])
    budget = int(self.inf.cache_capacity) - int(np.asarray(cache.length)[0]) - 1
    if budget < 16:
      raise self.cache_room_error(int(np.asarray(cache.length)[0]), "the script")
    cache, text, _ = self.generate(cache, logits, rng, min(int(self.inf.max_script_tokens), budget))
    return "\n".join(ctx_lines) + "\n" + text

  def direct_interleaved(self, prompt: str, rng, shots: int | None, context: Storyboard | None,
                         references: Sequence[np.ndarray] = ()) -> tuple[str, list[np.ndarray]]:
    """Interleaved: (the text the model wrote, its keyframes), at most ``shots`` keyframes."""
    seg, engine = self.layout, self.engine
    cap = int(self.inf.cache_capacity)
    cache = self.keyframes.fresh_cache(references, 1)
    images: list[np.ndarray] = []
    if context is None:
      text = script_schema.prompt_line(prompt) + "\n"
      cache, logits = engine.prefill(cache, [[seg.text([script_schema.prompt_line(prompt)], close=False)]])
    else:  # replay the existing story as context, then continue after its last video line
      old = dataclasses.replace(context.script, prompt=prompt)
      cache, _ = engine.prefill(cache, [[seg.text(prompt_layout.first_text_lines(old))]])
      for k, img in enumerate(context.keyframes, start=1):
        last = k == len(context.keyframes)
        tail = prompt_layout.tail_lines(old, k)[:1 if last else None]  # the last: its video line, left open
        clean = seg.image(seg.codec.encode(img), False)
        caption = seg.caption(script_schema.header_lines(old), script_schema.frame_line(old, k))
        cache, logits = engine.prefill(cache, [[*caption, clean, seg.text(tail, close=not last)]])
        images.append(img)
      text = script_schema.render(old)
    while True:
      budget = cap - int(np.asarray(cache.length)[0]) - seg.grid * seg.grid - 8 - seg.caption_room(text.splitlines())
      if budget <= 8:
        if not images and text.count("\n") <= 1:  # not even the first shot fits: say so, do not resample
          raise self.cache_room_error(int(np.asarray(cache.length)[0]), "a shot and its keyframe")
        break
      rng, key = jax.random.split(rng)
      banned = self.banned_after_keyframe(text, len(images) + 1) if images else None
      cache, chunk_text, stopped = self.generate(cache, logits, key, min(int(self.inf.max_chunk_tokens), budget),
                                                 banned)
      text += chunk_text
      k = len(images) + 1
      last_line = text.strip().splitlines()[-1] if text.strip() else ""
      wants_image = stopped and last_line.startswith(f"<Frame{k}>")
      if not wants_image or (shots is not None and k > shots):
        break
      caption = seg.caption(text.splitlines(), last_line)
      if caption:  # the keyframe caption the planner puts before every noised keyframe
        if int(np.asarray(cache.length)[0]) + len(caption[0].token_ids) + seg.keyframe_slots > cap:
          break  # a header written at the cache's very end: the shot without its keyframe is cut
        cache, _ = engine.prefill(cache, [caption])
      rng, key = jax.random.split(rng)
      latents = self.keyframes.sample(cache, key, 1)
      images.append(seg.codec.decode(latents))
      # the schema allows only the <Videok> line after keyframe k: the director writes its tag (one
      # token in every tokenizer, as in a training row), as it writes the image markers; the model
      # writes the rest of the line
      tag = f"<Video{k}>"
      cache, logits = engine.prefill(cache, [[seg.image(latents, False), seg.opened_tag(tag)]])
      text += tag
    return text, images
