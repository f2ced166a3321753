"""KV-cached inference equals full recomputation; guidance math; Euler schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax import layout
from unimage_jax.inference import chunks, flow
from unimage_jax.inference.engine import Engine, SamplingParams
from unimage_jax.model import functional
from unimage_jax.model.unimage import latent_token_dim

S, E = 3, 4


@pytest.fixture
def engine(tiny_config):
  cfg = tiny_config.model
  params, tables = functional.init_params(cfg, 0)
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(0)
  params["llm2vae"]["kernel"] = rng.normal(size=params["llm2vae"]["kernel"].shape).astype(np.float32)
  return Engine(functional.model_def(cfg), params, tables, cfg), cfg


def _full_forward(engine, cfg, segments, latents=None, t=None):
  """Uncached reference: the training forward on one packed row holding the whole sequence."""
  n = layout.sample_lengths(segments)
  sizes = layout.BufferSizes(n[0], max(n[1], 1), max(n[2], 1), n[3])
  row = layout.pack_row([segments], sizes, latent_token_dim(cfg), cfg.max_latent_grid, cfg.vit.patch_size**2 * 3)
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  model = engine.mdef.bind(engine.params, engine.tables)
  lat = batch["gen_latents"] if latents is None else latents
  ts = jnp.zeros(batch["gen_latent_pos"].shape) if t is None else jnp.where(batch["gen_segment_kinds"] == 4, t, 0.0)
  hidden, velocity = model(batch, lat, ts)
  return model.logits(hidden)[0], velocity[0], batch


def _context(cfg):
  rng = np.random.default_rng(1)
  lat = rng.normal(size=(4, latent_token_dim(cfg))).astype(np.float32)
  return [layout.TextSegment(np.array([1, 20, 21, 22])), layout.ImageSegment(lat, 2, 2, False, S, E),
          layout.TextSegment(np.array([23, 24]))]


def test_cached_greedy_decoding_equals_full_recomputation(engine):
  eng, cfg = engine
  context = _context(cfg)
  cache = eng.new_cache(1, 64)
  cache, logits = eng.prefill(cache, [context])
  cache, tokens = eng.generate(cache, logits, jax.random.key(0), max_new=8, stop_ids=[-5],
                               sampling=SamplingParams(temperature=0.0))
  cached = [int(x) for x in np.asarray(tokens[0])]
  assert int(cache.length[0]) == 4 + 4 + 2 + 2 + 8
  text = [23, 24]
  uncached = []
  for _ in range(8):
    segs = context[:2] + [layout.TextSegment(np.array(text))]
    logits_full, _, batch = _full_forward(eng, cfg, segs)
    last = int(np.max(np.where(np.asarray(batch["und_segment_kinds"][0]) > 0)[0]))
    nxt = int(np.argmax(np.asarray(logits_full[last])))
    uncached.append(nxt)
    text.append(nxt)
  assert cached == uncached
  assert len(set(cached)) > 1  # a non-degenerate sequence


def test_banned_tokens_are_never_sampled(engine):
  """Schema constraints: a token the caller bans never comes out, even when it is the argmax."""
  eng, cfg = engine
  cache, logits = eng.prefill(eng.new_cache(1, 64), [_context(cfg)])
  favourite = int(np.argmax(np.asarray(logits[0])))
  free = eng.generate(cache, logits, jax.random.key(0), max_new=12, stop_ids=[-5],
                      sampling=SamplingParams(temperature=0.0))[1]
  assert int(free[0, 0]) == favourite
  banned = np.zeros(cfg.vocab_size, bool)
  banned[[int(t) for t in np.asarray(free[0])]] = True  # everything the free run wrote
  _, tokens = eng.generate(cache, logits, jax.random.key(0), max_new=12, stop_ids=[-5],
                           sampling=SamplingParams(temperature=1.0), banned=banned)
  assert not banned[np.asarray(tokens[0])].any(), (np.asarray(tokens[0]), np.flatnonzero(banned))


def test_cached_velocity_equals_full_forward(engine):
  eng, cfg = engine
  context = _context(cfg)
  rng = np.random.default_rng(2)
  x_t = rng.normal(size=(4, latent_token_dim(cfg))).astype(np.float32)
  image = layout.ImageSegment(x_t, 2, 2, True, S, E)
  cache = eng.new_cache(1, 32)
  cache, _ = eng.prefill(cache, [context])
  chunk = chunks.chunk_from_segments([[image]], cache, cfg)
  v_cached = np.asarray(eng.velocity(cache, chunk, jnp.asarray(x_t)[None], 0.7))[0]
  full_lat = np.concatenate([context[1].latents, x_t])[None]
  _, v_full, batch = _full_forward(eng, cfg, context + [image], latents=jnp.asarray(full_lat), t=0.7)
  np.testing.assert_allclose(v_cached, np.asarray(v_full)[4:8], atol=1e-5, rtol=1e-5)
  assert np.abs(v_cached).max() > 1e-3


def test_extend_follows_scan_layers_with_one_result(engine):
  """The cached path runs its layers like the forward (config.model.scan_layers); scanned or
  unrolled, it writes the same cache and predicts the same logits and velocity. remat_policy only
  matters to gradients: the cached path ignores it."""
  eng, cfg = engine
  rng = np.random.default_rng(3)
  x_t = rng.normal(size=(4, latent_token_dim(cfg))).astype(np.float32)
  results = []
  for scan, remat in ((False, "none"), (True, "full")):
    c = cfg.copy_and_resolve_references()
    c.update(scan_layers=scan, remat_policy=remat)
    e = Engine(functional.model_def(c), eng.params, eng.tables, c)
    cache, logits = e.prefill(e.new_cache(1, 32), [_context(c)])
    chunk = chunks.chunk_from_segments([[layout.ImageSegment(x_t, 2, 2, True, S, E)]], cache, c)
    velocity = e.velocity(cache, chunk, jnp.asarray(x_t)[None], 0.7)
    results.append([np.asarray(a) for a in (logits, cache.k, cache.v, velocity)])
  for unrolled, scanned in zip(*results):
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)
  assert np.abs(results[0][3]).max() > 1e-3


def test_guidance_scale_one_is_the_conditional_prediction():
  rng = np.random.default_rng(0)
  v, vt, vi = (jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) for _ in range(3))
  for renorm in flow.RENORM_TYPES:
    p = flow.GuidanceParams(text_scale=1.0, img_scale=1.0, renorm_type=renorm)
    np.testing.assert_allclose(flow.guided_velocity(v, vt, vi, jnp.float32(0.8), p), v, atol=1e-6)


@pytest.mark.parametrize("renorm", flow.RENORM_TYPES)
def test_renorm_bounds_the_guided_norm(renorm):
  rng = np.random.default_rng(1)
  v, vt, vi = (jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) for _ in range(3))
  p = flow.GuidanceParams(text_scale=6.0, img_scale=1.0, renorm_type=renorm)
  out = flow.guided_velocity(v, vt, vi, jnp.float32(0.8), p)
  if renorm == "global":
    assert float(jnp.linalg.norm(out)) <= float(jnp.linalg.norm(v)) * (1 + 1e-5)
  else:
    assert np.all(np.asarray(jnp.linalg.norm(out, axis=-1)) <= np.asarray(jnp.linalg.norm(v, axis=-1)) * (1 + 1e-5))
  raw = vt + 6.0 * (v - vt)
  assert not np.allclose(np.asarray(out), np.asarray(raw))  # renorm actually acted
  # outside the interval guidance is off
  np.testing.assert_allclose(flow.guided_velocity(v, vt, vi, jnp.float32(0.2), p), v, atol=1e-6)


def test_euler_schedule_integrates_a_constant_velocity_exactly():
  x1 = jnp.ones((3,))
  out = flow.euler_sample(lambda x, t: jnp.full_like(x, 2.0), x1, num_steps=11, shift=3.0)
  np.testing.assert_allclose(out, x1 - 2.0, atol=1e-6)  # t goes 1 -> 0: total displacement v * 1
  ts = np.asarray(flow.sampling_timesteps(5, 3.0))
  assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)


def test_sample_image_with_guidance_rows(engine):
  eng, cfg = engine
  context = _context(cfg)
  cache = eng.new_cache(3, 32)
  cache, _ = eng.prefill(cache, [context, context[1:2], context[:1] + context[2:]])
  lat = np.zeros((4, latent_token_dim(cfg)), np.float32)
  chunk = chunks.chunk_from_segments([[layout.ImageSegment(lat, 2, 2, True, S, E)]] * 3, cache, cfg)
  out = eng.sample_image(cache, chunk, jax.random.key(0), num_steps=4, shift=3.0)
  assert out.shape == (4, latent_token_dim(cfg)) and np.all(np.isfinite(np.asarray(out)))
