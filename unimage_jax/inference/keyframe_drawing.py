"""Keyframes for a script: each one sampled by the gen expert after its context, and added to the
context of the next as clean latents (docs/ARCHITECTURE.md §5).

* ``disentangled`` (stage-2 checkpoints): keyframe k is drawn from ``[script] [clean keyframes
  1..k-1] [<Framek> line] [noised image]``, with classifier-free guidance over three cache rows:
  full context, without text (keyframes only), without images (script only), the conditions
  conditioning dropout trained.
* ``interleaved`` (stage-1 checkpoints), teacher-forced: the script's own lines between the
  keyframes, as the interleaved task lays them out.

Reference images come first in every row that sees images; the row "without images" leaves them out.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np

from unimage_jax import prompt_layout, script_schema
from unimage_jax.inference import chunks, flow
from unimage_jax.inference.director_layout import DirectorLayout
from unimage_jax.inference.engine import Engine
from unimage_jax.inference.kv_cache import KVCache
from unimage_jax.script_schema import Script


class KeyframeDrawer:
  """Samples keyframes with one engine, laid out by one :class:`DirectorLayout`."""

  def __init__(self, engine: Engine, layout: DirectorLayout, config: ml_collections.ConfigDict):
    self.engine, self.layout = engine, layout
    self.inf = config.inference  # read at each draw: --set may change it
    self.model_config = config.model

  def guided(self) -> bool:
    return float(self.inf.cfg_text_scale) != 1.0 or float(self.inf.cfg_img_scale) != 1.0

  def guidance(self) -> flow.GuidanceParams:
    g = self.inf
    return flow.GuidanceParams(float(g.cfg_text_scale), float(g.cfg_img_scale), tuple(g.cfg_interval),
                               g.cfg_renorm_type, float(g.cfg_renorm_min))

  def prefill_references(self, cache: KVCache, references: Sequence[np.ndarray], rows: int) -> KVCache:
    """Reference images as the first context of every row that sees images (rows 0 and 1 of the
    guidance triple; row 2 is "without images")."""
    for image in references:
      ctx = self.layout.context_image(image)
      cache, _ = self.engine.prefill(cache, [ctx, ctx, []][:rows])
    return cache

  def fresh_cache(self, references: Sequence[np.ndarray], rows: int) -> KVCache:
    """An empty cache of ``rows`` rows at ``inference.cache_capacity``, references prefilled."""
    return self.prefill_references(self.engine.new_cache(rows, int(self.inf.cache_capacity)), references, rows)

  def sample(self, cache: KVCache, rng, rows: int) -> np.ndarray:
    """The latents [grid*grid, D] of the keyframe whose context ``cache`` holds."""
    noised = self.layout.noised_image(self.engine.latent_dim)
    chunk = chunks.chunk_from_segments([[noised]] * rows, cache, self.model_config)
    latents = self.engine.sample_image(cache, chunk, rng, num_steps=int(self.inf.num_steps),
                                       shift=float(self.inf.timestep_shift), guidance=self.guidance())
    return np.asarray(latents)

  def draw(self, script: Script, rng, mode: str, earlier: Sequence[np.ndarray],
           references: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 keyframes of every shot: ``earlier`` kept, the shots after them drawn."""
    draw = self.draw_disentangled if mode == "disentangled" else self.draw_interleaved
    return draw(script, rng, list(earlier), references)

  def draw_disentangled(self, script: Script, rng, earlier: list[np.ndarray],
                        references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    seg, engine = self.layout, self.engine
    rows = 3 if self.guided() else 1
    base = self.fresh_cache(references, rows)
    script_text = seg.text(script_schema.render(script).splitlines())
    # rows: full context, without text (keyframes only), without images (script only)
    base, _ = engine.prefill(base, [[script_text], [], [script_text]][:rows])
    images = list(earlier)
    for img in earlier:
      ctx_img = seg.context_image(img)
      base, _ = engine.prefill(base, [ctx_img, ctx_img, []][:rows])
    header = script_schema.header_lines(script)
    for k in range(len(earlier) + 1, len(script.shots) + 1):
      line = script_schema.frame_line(script, k)
      frame = [seg.text([line]), *seg.caption(header, line)]
      ctx, _ = engine.prefill(base, [frame, [], frame][:rows])
      rng, key = jax.random.split(rng)
      latents = self.sample(ctx, key, rows)
      images.append(seg.codec.decode(latents))
      ctx_img = seg.context_image(images[-1], latents)
      base, _ = engine.prefill(base, [ctx_img, ctx_img, []][:rows])
    return images

  def draw_interleaved(self, script: Script, rng, earlier: list[np.ndarray],
                       references: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Teacher-forced: the script's own lines between the keyframes."""
    seg, engine = self.layout, self.engine
    cache = self.fresh_cache(references, 1)
    n = len(script.shots)
    tail = lambda k: seg.text(prompt_layout.tail_lines(script, k))
    header = script_schema.header_lines(script)
    caption = lambda k: seg.caption(header, script_schema.frame_line(script, k))
    cache, _ = engine.prefill(cache, [[seg.text(prompt_layout.first_text_lines(script))]])
    images = list(earlier)
    for k, img in enumerate(earlier, start=1):
      cache, _ = engine.prefill(cache, [[*caption(k), seg.image(seg.codec.encode(img), False), tail(k)]])
    for k in range(len(earlier) + 1, n + 1):
      if captioned := caption(k):
        cache, _ = engine.prefill(cache, [captioned])
      rng, key = jax.random.split(rng)
      latents = self.sample(cache, key, 1)
      images.append(seg.codec.decode(latents))
      if k < n:
        cache, _ = engine.prefill(cache, [[seg.image(latents, False), tail(k)]])
    return images
