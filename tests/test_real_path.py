"""The real path at tiny size: FLUX-architecture VAE latents (offline ArrayRecord cache) and an HF
tokenizer through data and the director; missing / mismatched VAEs and caches are clear errors."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import data_fixtures
from data_pipelines import latent_cache, pipeline
from data_pipelines.builders import decode_record, load_source
from unimage_jax import layout, script_schema
from unimage_jax.director import Director, DirectorError
from unimage_jax.model import functional
from unimage_jax.tokenizer import load_tokenizer
from unimage_jax.vae import flux_vae, store, training

VAE = flux_vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4)


def _config(tmp_path, vae_path=None):
  """The tiny StoryWorld build (32 px) with a flux_vae model: 32 px -> 4x4x16 latents -> 2x2 tokens."""
  c = data_fixtures.tiny_config()
  c.model.update(autoencoder="flux_vae", latent_channels=16, vae_downsample=8, max_latent_grid=4,
                 num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.data.update(latent_cache_dir=str(tmp_path / "latents"),
                tokenizer_path=pipeline.default_hf_tokenizer_path(c))
  if vae_path is None:
    vae_path = str(tmp_path / "vae")
    store.save_vae(flux_vae.FluxVAE(VAE, rngs=nnx.Rngs(0)), vae_path)
  c.model.vae_path = vae_path
  return c


def test_saved_vae_round_trips_and_codec_matches_the_model(tmp_path):
  vae = flux_vae.FluxVAE(VAE, rngs=nnx.Rngs(3))
  store.save_vae(vae, str(tmp_path / "v"))
  back = store.load_vae(str(tmp_path / "v"))
  assert back.config == VAE and store.fingerprint(back) == store.fingerprint(vae)
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
  tokens = store.Codec(back, 2, batch=2).encode(images)  # 3 images through a batch of 2 (padding)
  assert tokens.shape == (3, 4, 64)
  z = vae.encode(images.astype(np.float32) / 127.5 - 1.0)  # [3, 4, 4, 16]
  # BAGEL's patchify: [C, h, p, w, p] -> [h, w, p, p, C]
  want = np.asarray(z).transpose(0, 3, 1, 2).reshape(3, 16, 2, 2, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(3, 4, 64)
  np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(store.latents_from_tokens(tokens, 2, 2, 2)), np.asarray(z), atol=1e-6)


def test_latent_cache_resumes_refuses_other_vaes_and_feeds_the_pipeline(tmp_path):
  c = _config(tmp_path)
  pipeline.ensure_dataset(c, verbose=False)  # HF tokenizer + cache built on first use
  directory = latent_cache.cache_dir(c, "train")
  manifest = latent_cache.read_manifest(directory)
  source = load_source(c.data.data_dir, "storyworld", "train")
  assert manifest["complete"] and manifest["num_records"] == len(source)
  cached = latent_cache.LatentCache(directory)
  codec = store.Codec(store.load_vae(c.model.vae_path), 2)
  rec = decode_record(source[5])
  np.testing.assert_allclose(cached[5]["tokens"], codec.encode(np.stack(rec["keyframes"])), atol=1e-5)
  assert cached[5]["story_id"] == rec["story_id"]

  # resume: a shard removed (an interrupted run) is the only one encoded again
  _, counts = latent_cache.build_for_config(c, "train", log=lambda _: None)
  assert counts["encoded"] == 0
  os.remove(os.path.join(directory, latent_cache.shard_name(0)))
  _, counts = latent_cache.build_for_config(c, "train", log=lambda _: None)
  assert counts == {"shards": manifest["shards"], "encoded": 1, "kept": manifest["shards"] - 1}

  # the pipeline's batches carry the cached tokens of the noised/clean keyframes
  batch = next(pipeline.make_train_iterator(c, process_index=0, process_count=1))
  kinds = batch["gen_segment_kinds"]
  assert batch["gen_latents"].shape[-1] == 64 and (kinds == layout.KIND_NOISE).sum() > 0
  assert np.abs(batch["gen_latents"][kinds != layout.KIND_PAD]).max() > 0

  # another VAE's cache is refused before anything compiles, naming the folder and the fix
  other = str(tmp_path / "vae2")
  store.save_vae(flux_vae.FluxVAE(VAE, rngs=nnx.Rngs(1)), other)
  c.model.vae_path = other
  with pytest.raises(latent_cache.LatentCacheError, match="fingerprint"):
    pipeline.make_train_iterator(c, process_index=0, process_count=1)
  with pytest.raises(latent_cache.LatentCacheError, match="--overwrite"):
    latent_cache.build_for_config(c, "train", log=lambda _: None)


def test_missing_or_mismatched_vae_is_a_clear_error(tmp_path):
  c = _config(tmp_path, vae_path=str(tmp_path / "nowhere"))
  with pytest.raises(store.VAEError, match="config.model.vae_path='.*nowhere' does not exist"):
    latent_cache.load_checked_vae(c)
  small = flux_vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
  store.save_vae(flux_vae.FluxVAE(small, rngs=nnx.Rngs(0)), str(tmp_path / "small"))
  c.model.vae_path = str(tmp_path / "small")
  with pytest.raises(store.VAEError, match="4 latent channels but config.model.latent_channels=16.*downsamples 2x"):
    latent_cache.load_checked_vae(c)
  params, tables = functional.init_params(c.model, 0)
  with pytest.raises(DirectorError, match="config.model.vae_path"):
    Director(c, params, tables, None)


def test_director_decodes_with_the_vae_and_encodes_continuation_images(tmp_path):
  c = _config(tmp_path)
  pipeline.ensure_dataset(c, verbose=False)
  c.inference.update(num_steps=3, cache_capacity=1024)
  c.data.use_vit_context = True  # context keyframes also go through the ViT
  params, tables = functional.init_params(c.model, 0)
  head = params["llm2vae"]["kernel"]  # zero at init: give the keyframes a dependence on their context
  params["llm2vae"]["kernel"] = jax.random.normal(jax.random.key(5), head.shape, head.dtype) * 0.1
  director = Director(c, params, tables, load_tokenizer(c.data.tokenizer_path, c.model.vocab_size))
  assert director.layout.use_vit and director.layout.grid == 2
  record = decode_record(load_source(c.data.data_dir, "storyworld", "validation")[0])
  script = record["script"]
  script = script_schema.Script(script.prompt, script.characters, script.environments, script.shots[:2])
  images = director.keyframes.draw_disentangled(script, jax.random.key(0), [])
  assert len(images) == 2 and all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
  # the decoder is the VAE's: decoding the encoder's tokens of a frame gives the VAE reconstruction
  tokens = director.codec.encode(record["keyframes"][0])
  vae = store.load_vae(c.model.vae_path)
  want = store.Codec(vae, 2).decode(tokens[None], 2, 2)[0]
  np.testing.assert_array_equal(director.codec.decode(tokens), want)
  # continuation: the earlier keyframe is encoded as context and kept
  more = director.keyframes.draw_disentangled(script, jax.random.key(1), [record["keyframes"][0]])
  np.testing.assert_array_equal(more[0], record["keyframes"][0])
  assert len(more) == 2
  # reference images: encoded by the VAE encoder, they take their slots first and the keyframes see them
  encoded = []
  encode = director.codec.vae.encode  # the VAE's batch encoder behind the director's codec
  director.codec.vae.encode = lambda x: encoded.append(np.asarray(x)) or encode(x)
  ref = record["keyframes"][1]
  cache = director.keyframes.prefill_references(director.engine.new_cache(1, 1024), [ref, ref], 1)
  assert int(np.asarray(cache.length)[0]) == 2 * director.layout.context_slots() == 2 * (4 + 2 + 16 + 2)
  assert len(encoded) == 2 and np.array_equal(encoded[0][0], ref)
  with_ref = director.draw_keyframes(script, seed=0, mode="disentangled", references=[ref])
  without = director.draw_keyframes(script, seed=0, mode="disentangled")
  assert not np.array_equal(with_ref[0], without[0])
  with pytest.raises(DirectorError, match="reference image 0 must be uint8"):
    director.draw_keyframes(script, references=[ref.astype(np.float32)])


def test_tiny_vae_trains_and_reconstructs_flat_frames():
  """A few steps of the StoryWorld VAE trainer lower the reconstruction error; the normalisation
  is measured (unit-scale latents)."""
  c = data_fixtures.tiny_config()
  images = training.keyframes(c, "train", limit=64)
  cfg = flux_vae.VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16,
                           norm_num_groups=4)
  untrained = flux_vae.FluxVAE(cfg, rngs=nnx.Rngs(0))
  untrained.config = cfg
  before = training.reconstruction_psnr(untrained, images[:16])
  vae, metrics = training.train_vae(images, cfg, steps=60, batch=8, log=None)
  after = training.reconstruction_psnr(vae, images[:16])
  assert after > before + 3, (before, after)
  z = store.Codec(vae, 2).encode(images[:32])
  assert 0.5 < float(np.std(z)) < 2.0 and abs(float(np.mean(z))) < 0.5, metrics


def test_keyframe_captions_on_the_real_path(tmp_path):
  """``data.keyframe_caption='place'`` with the HF tokenizer and cached VAE latents: the planner puts
  the shot's environment line, in HF tokens, before the cached latents of its noised keyframe, and
  the director writes the same caption before each keyframe it draws."""
  from data_pipelines.sequence_plan import PlanConfig, Planner
  c = _config(tmp_path)
  c.data.keyframe_caption = "place"
  pipeline.ensure_dataset(c, verbose=False)
  tok = load_tokenizer(c.data.tokenizer_path, c.model.vocab_size)
  source = latent_cache.WithLatents(load_source(c.data.data_dir, "storyworld", "train"),
                                    latent_cache.LatentCache(latent_cache.cache_dir(c, "train")))
  record = decode_record(source[5])
  record["latents"] = source[5]["latents"]
  script = record["script"]
  segs = Planner(PlanConfig.from_config(c), tok).plan(record, np.random.default_rng(0), "interleaved").segments
  env_of = lambda k: f"<Environment{script_schema.referenced(script.shots[k - 1].frame, 'Environment')[0]}>:"
  first_noised = next(i for i, s in enumerate(segs) if isinstance(s, layout.ImageSegment) and s.noised)
  caption = segs[first_noised - 1]
  assert isinstance(caption, layout.TextSegment) and not caption.train
  assert tok.decode(caption.token_ids[1:-1]).strip().startswith(env_of(1))
  np.testing.assert_allclose(segs[first_noised].latents, np.asarray(record["latents"]["tokens"][0]))

  c.inference.update(num_steps=2, cache_capacity=1024)
  params, tables = functional.init_params(c.model, 0)
  director = Director(c, params, tables, tok)
  prefilled, sample = [], director.keyframes.sample
  prefill = director.engine.prefill
  director.engine.prefill = lambda cache, rows: prefilled.append(rows[0]) or prefill(cache, rows)
  captions = []
  director.keyframes.sample = lambda cache, rng, rows: captions.append(prefilled[-1]) or sample(cache, rng, rows)
  two = script_schema.Script(script.prompt, script.characters, script.environments, script.shots[:2])
  images = director.keyframes.draw_interleaved(two, jax.random.key(0), [])
  assert len(images) == 2 and all(im.shape == (32, 32, 3) for im in images)
  assert [tok.decode(rows[-1].token_ids[1:-1]).strip().split(" ")[0] for rows in captions] == [env_of(1), env_of(2)]
