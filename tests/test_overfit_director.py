"""The director's image side end to end: overfit one StoryWorld story, then draw its keyframes.

Training lays the story out as the interleaved task does (data pipeline planner, packed row) and
the director draws every keyframe from the story's own script through the KV cache (prefill,
Euler sampling, clean latents appended), so any disagreement between the training rows and the
inference chunks (metadata, positions, masks, timesteps) shows up as wrong pictures. They are
scored with the exact StoryWorld metrics against the script.
"""

import jax
import jax.numpy as jnp
import numpy as np

import data_fixtures
from data_pipelines.builders import decode_record, load_source
from data_pipelines.pipeline import row_encoder
from data_pipelines.sequence_plan import PlanConfig, Planner
from unimage_jax import layout, script_schema, sharding
from unimage_jax.director import Director
from unimage_jax.evaluation import metrics
from unimage_jax.tokenizer import Tokenizer
from unimage_jax.training.train_setup import setup_train

STEPS = int(__import__("os").environ.get("OVERFIT_STEPS", 500))  # ~2.5 min on 2 quiet cores


def _short_story(config, shots: int = 3):
  """The first validation story with at least ``shots`` shots, cut to that many."""
  source = load_source(config.data.data_dir, "storyworld", "validation")
  for i in range(len(source)):
    record = decode_record(source[i])
    if len(record["script"].shots) >= shots:
      s = record["script"]
      record["script"] = script_schema.Script(s.prompt, s.characters, s.environments, s.shots[:shots])
      record["keyframes"] = record["keyframes"][:shots]
      return record
  raise AssertionError("no validation story is long enough")


def test_overfit_one_story_then_draw_its_keyframes():
  c = data_fixtures.tiny_config()
  c.data.update(batch_size=2, und_len=320, gen_len=96, max_segments=16)
  # the tiny config's model and flow settings (x0 head, x0 loss), at training shift 3, one story
  c.model.timestep_shift = 3.0
  c.optim.update(learning_rate=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.05, ema_decay=0.0)
  c.train.steps = STEPS  # the cosine decays over the run: the last steps settle the fit
  c.inference.update(cache_capacity=512)
  record = _short_story(c)
  tok = Tokenizer(c.data.tokenizer_path, c.model.vocab_size)
  sample = Planner(PlanConfig.from_config(c), tok).plan(record, np.random.default_rng(0), task="interleaved")
  noised = [seg for seg in sample.segments if isinstance(seg, layout.ImageSegment) and seg.noised]
  assert len(noised) == 3, "every shot's keyframe is a target in the one row"
  batch = layout.stack_rows([row_encoder(c)([sample.segments])] * c.data.batch_size)

  setup = setup_train(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  state, step = setup.init_state(), setup.step
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, setup.batch_shardings)
  last = []
  for i in range(STEPS):
    state, m = step(state, batch)
    if i >= STEPS - 20:  # each step draws new t and noise: judge the mean of the last steps
      last.append((float(m["ce"]), float(m["mse"])))
  ce, mse = np.mean(last, axis=0)
  assert ce < 0.05 and mse < 0.03, (ce, mse)

  director = Director(c, jax.device_get(state.params), jax.device_get(state.tables), tok)
  script = record["script"]
  images = director.draw_keyframes(script, seed=0, mode="interleaved")
  result = metrics.score_story(metrics.StoryInput(record["story_id"], script.prompt, script, images,
                                                  script_schema.render(script), []))
  errors = [float(np.mean(np.abs(a.astype(float) - b.astype(float)))) for a, b in zip(images, record["keyframes"])]
  assert result["agreement"] >= 0.9, (result["per_shot"], errors)
  assert max(errors) < 12, errors  # mean absolute pixel error (0-255) per keyframe; 400 velocity-head steps: 17-19

  # the director from the prompt alone (greedy): it writes the memorised script back, valid as
  # written, with the <Videok> tags it writes itself after each keyframe
  director.inf.update(temperature=0.0, cfg_text_scale=1.0, cfg_img_scale=1.0)
  sb = director.direct(script.prompt, seed=0, mode="interleaved")
  assert metrics.validity(sb.raw_text)[0], (sb.raw_text, sb.repairs)
  assert sb.script == script, sb.raw_text
