"""What the keyframe velocity depends on: text, earlier clean keyframes, position, the timestep.

Why. A director whose image tokens ignore their context draws the same picture after any script;
the flow loss alone does not show it (a context-free denoiser already reaches a low MSE). This
probe asks the trained model directly. For held-out stories and shots it builds the context of a
keyframe exactly as training lays it out (``interleaved``: the script up to the shot's frame line
with the earlier clean keyframes between the lines; ``keyframe``: the whole script, the earlier
clean keyframes, the frame line), noises the true keyframe latents at timestep ``t``
(``x_t = (1 - t) x0 + t eps``) and reads the velocity of the noised image under changed contexts:

* ``other_text``  the text of another story (same images, same layout);
* ``no_images``   the earlier clean keyframes dropped;
* ``positions``   the latent grid positions of the noised image shuffled;
* ``timestep``    the same ``x_t`` read at ``t' = (t + 0.5) mod 1`` (does the model read the noise level?).

Reported per variant: the relative change ``|v' - v| / |v|``, and the error of the implied clean
image ``x0_hat = x_t - t v`` against the truth (mean squared, latent units), which is the number
that decides whether a keyframe shows the right place and cast.
Everything runs through the training forward pass (one packed row per probe, one compile).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimage_jax import layout
from unimage_jax.script_schema import frame_line, header_lines, referenced, video_line

VARIANTS = ("full", "other_text", "no_images", "positions", "timestep")


@dataclasses.dataclass
class ProbeRow:
  """One packed probe: the noised image is the last image segment of the row."""

  segments: list[layout.Segment]
  target: np.ndarray  # [n, Dl] true latent tokens of the noised image


def context_segments(planner, script, frames: Sequence[np.ndarray], k: int, task: str,
                     text_from=None) -> list[layout.Segment]:
  """Segments before keyframe ``k`` (1-based) in the ``task``'s training layout.

  ``text_from`` (a script) supplies the text instead of ``script`` (the ``other_text`` variant):
  its lines up to shot ``k`` (shorter scripts repeat their last shot's lines).
  """
  text = script if text_from is None else text_from
  n = len(text.shots)
  kk = lambda j: min(j, n)
  if task == "subject":  # the subject task's layout: the header and this shot's frame line, no image
    return [planner._text(header_lines(text) + [frame_line(text, kk(k))], False), *planner._caption(text, kk(k))]
  clean = [planner._image(frames[j - 1], noised=False) for j in range(1, k)]
  if task == "interleaved":
    segs: list[layout.Segment] = [planner._text(header_lines(text) + [frame_line(text, 1)], True)]
    for j in range(1, k):
      segs += [*planner._caption(text, kk(j)), clean[j - 1]]
      segs.append(planner._text([video_line(text, kk(j)), frame_line(text, kk(j + 1))], True))
    return segs + planner._caption(text, kk(k))
  lines = header_lines(text) + sum(([frame_line(text, j), video_line(text, j)] for j in range(1, n + 1)), [])
  return [planner._text(lines, False), *clean, planner._text([frame_line(text, kk(k))], False),
          *planner._caption(text, kk(k))]


def probe_segments(planner, record, other, k: int, task: str, variant: str) -> ProbeRow:
  script, frames = record["script"], record["keyframes"]
  if variant == "other_text":
    segs = context_segments(planner, script, frames, k, task, text_from=other["script"])
  else:
    segs = context_segments(planner, script, frames, k, task)
  if variant == "no_images":
    segs = [s for s in segs if not isinstance(s, layout.ImageSegment)]
  target = planner._image(frames[k - 1], noised=True)
  return ProbeRow(segs + [target], target.latents)


def _fit_row(row: ProbeRow, sizes: layout.BufferSizes) -> ProbeRow:
  """Drops the oldest context shots until the row fits (the noised image always stays)."""
  segs = list(row.segments)
  while True:
    u, g, v, s = layout.sample_lengths(segs)
    if u <= sizes.und_len and g <= sizes.gen_len and v <= sizes.vit_len and s <= sizes.max_segments:
      return ProbeRow(segs, row.target)
    images = [i for i, x in enumerate(segs[:-1]) if isinstance(x, layout.ImageSegment)]
    if not images:
      raise ValueError(f"a probe row does not fit {sizes} even without earlier keyframes")
    del segs[images[0]]


class FlowProbe:
  """Binds a model; ``run`` returns the per-variant statistics over stories and shots."""

  def __init__(self, model_def, params, tables, config, planner):
    self.config, self.planner = config, planner
    m, d = config.model, config.data
    # room for whole stories: twice the training row
    self.sizes = layout.BufferSizes(2 * d.und_len, 2 * d.gen_len, max(d.vit_len, 1), 2 * d.max_segments)
    self.latent_dim = m.latent_channels * m.latent_patch_size**2
    self.grid, self.vit_patch_dim, self.vit_grid = m.max_latent_grid, m.vit.patch_size**2 * 3, m.vit.max_patches_per_side

    def velocity(params, tables, batch, x_t, t):
      model = model_def.bind(params, tables)
      return model(batch, x_t, t)[1]

    self._velocity = jax.jit(velocity)
    self.params, self.tables = params, tables

  def _row(self, probe: ProbeRow, shuffle_positions: np.random.Generator | None = None):
    row = layout.pack_row([probe.segments], self.sizes, self.latent_dim, self.grid, self.vit_patch_dim, self.vit_grid)
    n = len(probe.target)
    gen_used = int(np.sum(row["gen_sample_ids"] >= 0))
    target_slots = np.arange(gen_used - n, gen_used)  # the noised image is the last gen segment
    if shuffle_positions is not None:
      row["gen_latent_pos"][target_slots] = shuffle_positions.permutation(row["gen_latent_pos"][target_slots])
    return row, target_slots

  def velocity_of(self, probe: ProbeRow, t: float, eps: np.ndarray, read_t: float | None = None,
                  shuffle: np.random.Generator | None = None):
    """(velocity of the noised image [n, Dl], x_t [n, Dl]) with the true keyframe noised at ``t``."""
    x_t = ((1.0 - t) * probe.target + t * eps).astype(np.float32)
    return self.velocity_at(probe, x_t, t if read_t is None else read_t, shuffle), x_t

  def velocity_at(self, probe: ProbeRow, x_t: np.ndarray, t: float,
                  shuffle: np.random.Generator | None = None) -> np.ndarray:
    """Velocity [n, Dl] of the noised image at any latents ``x_t`` [n, Dl] (e.g. a sampler's) read at ``t``."""
    row, slots = self._row(probe, shuffle)
    latents = row["gen_latents"].copy()
    latents[slots] = x_t
    timesteps = np.zeros(latents.shape[0], np.float32)
    timesteps[slots] = t
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    v = self._velocity(self.params, self.tables, batch, jnp.asarray(latents[None]), jnp.asarray(timesteps[None]))
    return np.asarray(v[0])[slots]

  def run(self, records: Sequence[dict[str, Any]], task: str, timesteps=(0.5, 0.9), shots_per_story: int = 3,
          seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    stats: dict[str, dict[str, list[float]]] = {}
    for i, record in enumerate(records):
      other = records[(i + 1) % len(records)]
      n_shots = len(record["script"].shots)
      for k in sorted(rng.choice(np.arange(1, n_shots + 1), min(shots_per_story, n_shots), replace=False)):
        for t in timesteps:
          eps = rng.standard_normal((self.grid_tokens(record), self.latent_dim)).astype(np.float32)
          full = _fit_row(probe_segments(self.planner, record, other, int(k), task, "full"), self.sizes)
          v_full, x_t = self.velocity_of(full, t, eps)
          for variant in VARIANTS:
            if variant == "full":
              v = v_full
            elif variant == "positions":
              v, _ = self.velocity_of(full, t, eps, shuffle=np.random.default_rng(int(rng.integers(1 << 30))))
            elif variant == "timestep":
              v, _ = self.velocity_of(full, t, eps, read_t=(t + 0.5) % 1.0)
            else:
              probe = _fit_row(probe_segments(self.planner, record, other, int(k), task, variant), self.sizes)
              v, _ = self.velocity_of(probe, t, eps)
            x0_err = float(np.mean(np.square(x_t - t * v - full.target)))
            change = float(np.linalg.norm(v - v_full) / (np.linalg.norm(v_full) + 1e-9))
            s = stats.setdefault(f"{variant} t={t}", {"change": [], "x0_mse": []})
            s["change"].append(change)
            s["x0_mse"].append(x0_err)
    return {name: {k: float(np.mean(v)) for k, v in s.items()} for name, s in stats.items()}

  def place_by_story_places(self, records: Sequence[dict[str, Any]], task: str, decode,
                            shots_per_story: int = 3, seed: int = 0) -> dict[int, tuple[float, int]]:
    """Place accuracy of the implied clean image at ``t = 1`` (the context alone draws it), by
    the story's number of places: ``{places: (accuracy, shots)}``; ``decode`` maps latent tokens
    to a uint8 image (``director.codec.decode``: the pixel codec or the VAE decoder).

    Why: a model that has learned to draw the place words of its context, but not which place
    is *current* (the frame line's ``<EnvironmentK>`` resolved through its line, or the latest
    clean keyframe), draws one-place stories right and averages the places of the others.
    """
    from unimage_jax.evaluation import detector
    rng = np.random.default_rng(seed)
    hits: dict[int, list[bool]] = {}
    for record in records:
      truth, n_shots = record["ground_truth"], len(record["script"].shots)
      for k in sorted(rng.choice(np.arange(1, n_shots + 1), min(shots_per_story, n_shots), replace=False)):
        probe = _fit_row(probe_segments(self.planner, record, record, int(k), task, "full"), self.sizes)
        eps = rng.standard_normal(probe.target.shape).astype(np.float32)
        v, x_t = self.velocity_of(probe, 1.0, eps)
        want = truth["places"][truth["shots"][int(k) - 1]["env"]]
        hits.setdefault(len(truth["places"]), []).append(detector.detect_place(decode(x_t - v)) == want)
    return {n: (float(np.mean(h)), len(h)) for n, h in sorted(hits.items())}

  def frame_line_reads(self, records: Sequence[dict[str, Any]], task: str, decode, max_shot: int = 8,
                       seed: int = 0) -> dict[str, tuple[float, int]]:
    """How much the picture drawn by the context alone (implied x0 at ``t = 1``, uint8 pixels)
    moves when one thing in the script changes: ``{change: (mean |pixel change|, shots)}``.

    * ``place_tag``: the frame line's ``<EnvironmentK>`` swapped for another of the story's places;
    * ``subject_tag``: in a shot whose frame line names one character, its ``<CharacterK>``
      swapped for another cast member (a medium shot or close-up: the subject fills the frame);
    * ``cast_colours``: every cast line's colour word replaced by another colour;
    * ``noise_draw``: nothing in the script changed, another noise draw (the scale of a read: the
      clean-image estimate at ``t = 1`` should not depend on the noise at all).

    Why: the place and the subject are the same two-read lookup (a frame-line tag, then the
    words of that tag's line), so a model that moves with ``place_tag`` and not with
    ``subject_tag`` can read the lookup but has not learned it for characters.
    """
    from data_pipelines.storyworld import cast as cast_lib
    colours = list(cast_lib.COLOURS)
    rng = np.random.default_rng(seed)
    other_noise = np.random.default_rng(seed + 1)  # its own stream: the other rows keep their draws
    changes: dict[str, list[float]] = {"place_tag": [], "subject_tag": [], "cast_colours": [], "noise_draw": []}

    def picture(record, script, k: int, eps) -> np.ndarray:
      probe = _fit_row(probe_segments(self.planner, {**record, "script": script}, record, k, task, "full"), self.sizes)
      v, x_t = self.velocity_of(probe, 1.0, eps)
      return decode(x_t - v).astype(np.float32)

    def with_frame(script, k: int, old: str, new: str):
      shots = list(script.shots)
      shots[k - 1] = dataclasses.replace(shots[k - 1], frame=shots[k - 1].frame.replace(old, new))
      return dataclasses.replace(script, shots=shots)

    for record in records:
      script, truth = record["script"], record["ground_truth"]
      recoloured = dataclasses.replace(script, characters=[
          line.replace(f" {c['colour']} ", f" {colours[(colours.index(c['colour']) + 3) % len(colours)]} ", 1)
          for line, c in zip(script.characters, truth["cast"])])
      for k in range(1, min(max_shot, len(script.shots)) + 1):
        eps = rng.standard_normal((self.grid_tokens(record), self.latent_dim)).astype(np.float32)
        base = picture(record, script, k, eps)
        shot = truth["shots"][k - 1]
        n_env, n_cast = len(script.environments), len(script.characters)
        if n_env > 1:
          env = shot["env"] + 1
          changed = with_frame(script, k, f"<Environment{env}>", f"<Environment{env % n_env + 1}>")
          changes["place_tag"].append(float(np.abs(picture(record, changed, k, eps) - base).mean()))
        tags = referenced(script.shots[k - 1].frame, "Character")
        if n_cast > 1 and len(tags) == 1:
          subject = tags[0]
          changed = with_frame(script, k, f"<Character{subject}>", f"<Character{subject % n_cast + 1}>")
          changes["subject_tag"].append(float(np.abs(picture(record, changed, k, eps) - base).mean()))
        changes["cast_colours"].append(float(np.abs(picture(record, recoloured, k, eps) - base).mean()))
        other_eps = other_noise.standard_normal(eps.shape).astype(np.float32)
        changes["noise_draw"].append(float(np.abs(picture(record, script, k, other_eps) - base).mean()))
    return {name: (float(np.mean(c)) if c else float("nan"), len(c)) for name, c in changes.items()}

  def subject_drawing(self, records: Sequence[dict[str, Any]], decode, spelled_out: bool = False,
                      max_shot: int = 8, seed: int = 0) -> dict[str, float | None]:
    """The picture drawn by the context alone (implied x0 at ``t = 1``) in the subject layout (the
    header and the frame line of a shot that names one character), scored like a storyboard:
    ``{characters_drawn, place_accuracy, shots}`` (``metrics.score_shot``). ``spelled_out``: the
    frame line carries the subject's cast line in place of its tag.

    Why: a model that draws the subject when it is spelled out but not from its tag cannot
    resolve the tag; one that draws it in neither cannot yet draw what it is told.
    """
    from unimage_jax.evaluation import metrics, script_semantics
    from unimage_jax.prompt_layout import spelled_out_frame_line
    rng = np.random.default_rng(seed)
    shots = []
    for record in records:
      script = record["script"]
      sem = script_semantics.interpret(script)
      story = sem.story(script)
      for k in range(1, min(max_shot, len(script.shots)) + 1):
        if len(referenced(script.shots[k - 1].frame, "Character")) != 1:
          continue
        line = spelled_out_frame_line(script, k) if spelled_out else frame_line(script, k)
        target = self.planner._image(record["keyframes"][k - 1], noised=True)
        caption = self.planner._caption(script, k)
        probe = _fit_row(ProbeRow([self.planner._text(header_lines(script) + [line], False), *caption, target],
                                  target.latents), self.sizes)
        v, x_t = self.velocity_of(probe, 1.0, rng.standard_normal(probe.target.shape).astype(np.float32))
        shots.append(metrics.score_shot(sem, story, k - 1, decode(x_t - v))[0])
    return _scored(shots)

  def drawing_by_shot_size(self, records: Sequence[dict[str, Any]], task: str, decode,
                           seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Every shot's keyframe drawn by the context alone (implied x0 at ``t = 1``, the true script
    and the true earlier keyframes in the ``task``'s layout) and scored like a storyboard, by
    shot size: ``{size or "all": {characters_drawn, agreement, place_accuracy, shots}}``.

    Why: the free-run keyframes see the model's own earlier keyframes; with the true ones in
    context, a model that could copy or draw a character from them would show it here.
    """
    from unimage_jax.evaluation import metrics, script_semantics
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
      sem = script_semantics.interpret(record["script"])
      story = sem.story(record["script"])
      for k in range(1, len(record["script"].shots) + 1):
        probe = _fit_row(probe_segments(self.planner, record, record, k, task, "full"), self.sizes)
        v, x_t = self.velocity_of(probe, 1.0, rng.standard_normal(probe.target.shape).astype(np.float32))
        row = metrics.score_shot(sem, story, k - 1, decode(x_t - v))[0]
        for key in (story.shots[k - 1]["shot_size"], "all"):
          rows.setdefault(key, []).append(row)
    return {key: _scored(r) for key, r in rows.items()}

  def training_sample_drawing(self, records: Sequence[dict[str, Any]], task: str, decode, sampler_steps: int = 2,
                              shift: float = 3.0, samples_per_story: int = 3,
                              seed: int = 0) -> dict[str, float | None]:
    """The noised keyframe of the planner's own ``task`` samples (the training layout exactly,
    with the run's data options: ``subject_alone``, ``subject_spelled_out``, the caption), drawn
    from noise by the director's Euler sampler (``sampler_steps`` timesteps at ``shift``) and
    scored like a storyboard: ``{characters_drawn, agreement, place_accuracy, shots}``.

    Why: a run trained on one layout should draw at least that layout; on a run whose context
    spells out only the subject's description, this is the image side's ceiling, with no lookup
    and no distractor left to fail (README, "Diagnosing the keyframes").
    """
    from unimage_jax.evaluation import metrics, script_semantics
    from unimage_jax.inference.flow import sampling_timesteps
    rng = np.random.default_rng(seed)
    timesteps = np.asarray(sampling_timesteps(sampler_steps, shift), np.float32)
    shots = []
    for record in records:
      sem = script_semantics.interpret(record["script"])
      story = sem.story(record["script"])
      latents = [self.planner._image(f, noised=False).latents for f in record["keyframes"]]
      for _ in range(samples_per_story):
        segments = self.planner.plan(record, rng, task).segments
        noised = [i for i, s in enumerate(segments) if isinstance(s, layout.ImageSegment) and s.noised]
        if not noised:
          raise ValueError(f"the {task!r} task's samples hold no noised keyframe to draw")
        target = segments[noised[0]]
        probe = _fit_row(ProbeRow(segments[:noised[0]] + [target], target.latents), self.sizes)
        x = rng.standard_normal(target.latents.shape).astype(np.float32)  # [n, Dl]
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
          x = x - (t - t_next) * self.velocity_at(probe, x, float(t))
        k = next(j for j, lat in enumerate(latents) if np.array_equal(lat, target.latents))
        shots.append(metrics.score_shot(sem, story, k, decode(x))[0])
    return _scored(shots)

  def grid_tokens(self, record) -> int:
    return len(self.planner._image(record["keyframes"][0], noised=True).latents)


def _scored(shots: Sequence[dict[str, Any]]) -> dict[str, float | None]:
  """``{characters_drawn, agreement, place_accuracy, shots}`` of ``metrics.score_shot`` rows (NaN: no shots)."""
  from unimage_jax.evaluation import metrics
  mean = lambda key: float(np.mean([s[key] for s in shots])) if shots else float("nan")
  return {"characters_drawn": metrics.characters_drawn(shots), "agreement": mean("agreement"),
          "place_accuracy": mean("place_ok"), "shots": len(shots)}


def table(stats: dict[str, dict[str, float]], x0_variance: float) -> str:
  """Markdown rows: variant, relative velocity change, implied-x0 MSE (and vs the data variance)."""
  lines = ["| context | t | velocity change vs full | implied x0 MSE | x0 MSE / latent variance |", "|---|---|---|---|---|"]
  for name, s in stats.items():
    variant, t = name.split(" t=")
    lines.append(f"| {variant} | {t} | {s['change']:.3f} | {s['x0_mse']:.4f} | {s['x0_mse'] / x0_variance:.3f} |")
  return "\n".join(lines) + "\n"
