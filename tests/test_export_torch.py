"""JAX model -> BAGEL-layout safetensors -> PyTorch serving module: same logits and velocities."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from unimage_jax import layout, losses, synthetic  # noqa: E402
from unimage_jax.interchange import export, keymap, orbax_io, safetensors_io  # noqa: E402
from unimage_jax.model import functional  # noqa: E402
from unimage_jax.torch_serving import load_exported  # noqa: E402


def perturbed_params(cfg, seed=0):
  """Random params where norms, biases and the zero-initialised llm2vae are non-trivial too."""
  params, tables = functional.init_params(cfg, seed)
  rng = np.random.default_rng(seed)
  def bump(path, x):
    x = np.asarray(x)
    if path[-1].key in ("weight", "bias", "scale"):  # norms and biases start at 1 / 0
      x = x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
    return x

  params = jax.tree_util.tree_map_with_path(bump, params)
  params["llm2vae"]["kernel"] = 0.05 * rng.standard_normal(params["llm2vae"]["kernel"].shape).astype(np.float32)
  return params, jax.tree.map(np.asarray, tables)


def _jax_outputs(cfg, params, tables, batch, x_t, t):
  mdef = functional.model_def(cfg)

  @jax.jit
  def run(params, tables, batch, x_t, t):
    model = mdef.bind(params, tables)
    hidden, velocity = model(batch, x_t, t)
    return model.logits(hidden), velocity

  return [np.asarray(a) for a in run(params, tables, batch, x_t, t)]


def _config(tiny_config):
  cfg = tiny_config
  cfg.data.update(batch_size=2, und_len=96, gen_len=48, vit_len=16)
  return cfg


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_torch_module_matches_jax(tiny_config, tmp_path, prediction):
  cfg = _config(tiny_config)
  m = cfg.model
  m.flow_prediction = prediction  # BAGEL's velocity head, and the tiny configs' clean-latent head
  params, tables = perturbed_params(m, seed=3)
  batch = synthetic.random_batch(cfg, seed=5, samples_per_row=3)
  kinds = batch["gen_segment_kinds"]
  assert (kinds == layout.KIND_NOISE).any() and (kinds == layout.KIND_CLEAN).any()
  assert (batch["vit_image_ids"] >= 0).any(), "the row should carry a ViT image"
  assert batch["und_sample_ids"].max() >= 1, "several samples per row"
  x_t, t, _, _ = losses.noise_latents(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items()},
                                      cfg.data.max_segments, 3.0)
  logits, velocity = _jax_outputs(m, params, tables, batch, x_t, t)

  out = str(tmp_path / "export")
  shards = export.export_params(params, tables, m, out, dtype="float32", max_shard_bytes=200_000)
  assert len(shards) > 1, "small shard limit should give several shards"
  index = json.load(open(os.path.join(out, safetensors_io.INDEX_NAME)))
  assert "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight" in index["weight_map"]
  for name in ("llm_config.json", "vit_config.json", "vae_config.json"):
    assert os.path.exists(os.path.join(out, name))
  assert json.load(open(os.path.join(out, "vae_config.json")))["flow_prediction"] == prediction

  model = load_exported(out)
  tb = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    t_logits, t_velocity = model(tb, torch.from_numpy(np.array(x_t)), torch.from_numpy(np.array(t)))
  und_valid = batch["und_segment_kinds"] != layout.KIND_PAD
  gen_noise = batch["gen_segment_kinds"] == layout.KIND_NOISE
  np.testing.assert_allclose(t_logits.numpy()[und_valid], logits[und_valid], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(t_velocity.numpy()[gen_noise], velocity[gen_noise], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(t_logits.numpy(), logits, atol=1e-4, rtol=1e-4)  # padding too
  model.attention_chunk = 7  # the per-block mask gives the same outputs as the dense one
  with torch.no_grad():
    c_logits, c_velocity = model(tb, torch.from_numpy(np.array(x_t)), torch.from_numpy(np.array(t)))
  np.testing.assert_allclose(c_logits.numpy(), t_logits.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(c_velocity.numpy(), t_velocity.numpy(), atol=1e-5, rtol=1e-5)
  assert np.abs(velocity[gen_noise]).max() > 0.05 and np.abs(logits).max() > 0.1


def test_export_is_plain_safetensors_and_round_trips_bit_identically(tiny_config, tmp_path):
  from safetensors.numpy import load_file
  from unimage_jax.interchange import importers

  m = _config(tiny_config).model
  params, tables = perturbed_params(m, seed=1)
  out = str(tmp_path / "export")
  export.export_params(params, tables, m, out, dtype="float32", max_shard_bytes=100_000)
  # readable by the reference safetensors library, values equal to the keymap export
  ref = {}
  for f in sorted(os.listdir(out)):
    if f.endswith(".safetensors"):
      ref.update(load_file(os.path.join(out, f)))
  direct = dict(keymap.export_tensors(params, tables, m))
  assert set(ref) == set(direct)
  for k in direct:
    np.testing.assert_array_equal(ref[k], direct[k])

  p2, t2, cfg2 = importers.import_bagel(out)
  assert cfg2.to_dict() == m.to_dict()
  for (kp, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(x)[0] for x in (params, p2))):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(kp)
  assert jax.tree.structure(params) == jax.tree.structure(p2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), tables, t2)


def test_bf16_export_and_orbax_checkpoint_path(tiny_config, tmp_path):
  import ml_dtypes

  cfg = _config(tiny_config)
  cfg.model.vit.enabled = False
  cfg.data.vit_len = 0
  m = cfg.model
  params, tables = perturbed_params(m, seed=2)
  ckpt = str(tmp_path / "ckpt")
  orbax_io.save_params(ckpt, 7, params, tables, cfg)
  out = str(tmp_path / "bf16")
  export.export_checkpoint(ckpt, out, dtype="bfloat16")
  reader = safetensors_io.SafetensorsReader(out)
  direct = dict(keymap.export_tensors(params, tables, m))
  assert reader.keys() == set(direct)
  for k, v in direct.items():
    assert reader.dtype(k) == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(reader[k], v.astype(ml_dtypes.bfloat16))
  assert not os.path.exists(os.path.join(out, "vit_config.json"))
  # stacked arrays are read one layer at a time through TensorStore (not the whole-array fallback)
  lazy = orbax_io.LazyCheckpoint(ckpt)
  assert lazy.open("params", ("decoder", "layers", "gen", "mlp", "up_proj", "kernel")) is not None
  p2, t2, cfg2 = orbax_io.restore_params(ckpt)
  jax.tree.map(np.testing.assert_array_equal, params, p2)
  assert cfg2.model.to_dict() == m.to_dict()

  # bf16 weights load into the torch module and serve in bf16, close to the fp32 JAX outputs
  model = load_exported(out)
  assert model.language_model.lm_head.weight.dtype == torch.bfloat16
  batch = synthetic.random_batch(cfg, seed=1)
  logits, velocity = _jax_outputs(m, params, tables, batch, batch["gen_latents"], np.zeros(batch["gen_latent_pos"].shape, np.float32))
  with torch.no_grad():
    t_logits, t_velocity = model({k: torch.from_numpy(np.array(v)) for k, v in batch.items()})
  valid = batch["und_segment_kinds"] != layout.KIND_PAD
  err = np.abs(t_logits.numpy()[valid] - logits[valid]).max() / np.abs(logits[valid]).max()
  assert err < 0.05, err


def test_default_export_is_one_ema_safetensors_beside_a_vae(tiny_config, tmp_path):
  """BAGEL's loaders read ``<folder>/ema.safetensors`` and its release keeps ``ae.safetensors``
  (the VAE) beside it: the default export is that one file, and readers skip the VAE's."""
  from safetensors.numpy import save_file

  cfg = _config(tiny_config)
  m = cfg.model
  params, tables = perturbed_params(m, seed=4)
  ckpt = str(tmp_path / "run" / "checkpoints")
  orbax_io.save_params(ckpt, 2, params, tables, cfg)
  out = str(tmp_path / "export")
  step, names = export.export_checkpoint_step(str(tmp_path / "run"), out)  # a workdir resolves
  assert (step, names) == (2, ["ema.safetensors"])
  assert sorted(os.listdir(out)) == ["ema.safetensors", "llm_config.json", "unimage_config.json",
                                     "vae_config.json", "vit_config.json"]
  save_file({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, os.path.join(out, "ae.safetensors"))
  reader = safetensors_io.SafetensorsReader(out)
  assert reader.keys() == set(dict(keymap.export_tensors(params, tables, m)))
  llm = json.load(open(os.path.join(out, "llm_config.json")))
  del llm["qk_norm"]  # a BAGEL release's llm_config.json: q/k norms are BAGEL's default
  json.dump(llm, open(os.path.join(out, "llm_config.json"), "w"))
  model = load_exported(out)  # strict: an ae.safetensors key, or q/k norms left out, would fail
  np.testing.assert_array_equal(model.llm2vae.weight.detach().numpy(), params["llm2vae"]["kernel"].T)
  with pytest.raises(export.NoEmaError, match="saved no EMA"):
    export.export_checkpoint_step(str(tmp_path / "run"), str(tmp_path / "ema"), use_ema=True)
