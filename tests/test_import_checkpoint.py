"""Imports: Qwen2 HF checkpoints (logit parity with transformers), mismatch reports, CLI round trip."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tool_runs import assert_user_error  # noqa: E402
from unimage_jax import layout  # noqa: E402
from unimage_jax.interchange import export, importers, orbax_io, safetensors_io  # noqa: E402
from unimage_jax.interchange.keymap import KeyMismatchError  # noqa: E402
from unimage_jax.model import functional  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qwen2_dir(tmp_path, tie=False):
  cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_theta=1e6)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(cfg).eval().float()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))  # non-trivial norms and biases
  path = str(tmp_path / ("qwen2_tied" if tie else "qwen2"))
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _logits(cfg, params, tables, ids, und_len):
  sizes = layout.BufferSizes(und_len, 4, 0, 4)
  row = layout.pack_row([[layout.TextSegment(ids)]], sizes, latent_dim=192, latent_grid=4, vit_patch_dim=48)
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  model = functional.model_def(cfg).bind(params, tables)
  hidden, _ = model(batch, batch["gen_latents"], jnp.zeros(batch["gen_latent_pos"].shape))
  return np.asarray(model.logits(hidden))[0, :len(ids)]


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_hf_import_matches_transformers(tiny_config, tmp_path, tie):
  hf, path = _qwen2_dir(tmp_path, tie)
  cfg = tiny_config.model
  cfg.update(qk_norm=False, rope_theta=1e6)
  params, tables = importers.import_qwen2(path, cfg, seed=1)
  # gen expert is a copy of und (BAGEL's initialisation)
  layers = params["decoder"]["layers"]
  jax.tree.map(np.testing.assert_array_equal, layers["und"], layers["gen"])
  ids = np.random.default_rng(0).integers(0, 128, 13)
  with torch.no_grad():
    expected = hf(torch.tensor(ids[None])).logits[0].numpy()
  got = _logits(cfg, params, tables, ids, tiny_config.data.und_len)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
  assert np.abs(expected).max() > 0.1


def test_qwen2_config_and_key_mismatches_are_listed(tiny_config, tmp_path):
  _, path = _qwen2_dir(tmp_path)
  cfg = tiny_config.model
  cfg.update(qk_norm=False, rope_theta=1e6, mlp_dim=96)
  with pytest.raises(importers.ConfigMismatchError, match="mlp_dim=96"):
    importers.import_qwen2(path, cfg)
  cfg.mlp_dim = 128
  # drop one tensor, add one, change a shape
  reader = safetensors_io.SafetensorsReader(path)
  state = {k: np.array(reader[k]) for k in reader.keys()}
  del state["model.layers.0.self_attn.k_proj.bias"]
  state["model.extra.weight"] = np.zeros(3, np.float32)
  state["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 64), np.float32)
  from safetensors.numpy import save_file
  os.remove(os.path.join(path, "model.safetensors"))
  save_file(state, os.path.join(path, "model.safetensors"))
  with pytest.raises(KeyMismatchError) as err:
    importers.import_qwen2(path, cfg)
  msg = str(err.value)
  assert "1 missing: model.layers.0.self_attn.k_proj.bias" in msg
  assert "1 unexpected: model.extra.weight" in msg
  assert "model.layers.1.mlp.up_proj.weight: checkpoint has (5, 64)" in msg


def test_bagel_import_lists_missing_unexpected_and_wrong_shape(tiny_config, tmp_path):
  from safetensors.numpy import load_file, save_file

  m = tiny_config.model
  params, tables = functional.init_params(m, 0)
  out = str(tmp_path / "export")
  export.export_params(params, tables, m, out)
  files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  state = {}
  for f in files:
    state.update(load_file(os.path.join(out, f)))
    os.remove(os.path.join(out, f))
  assert files == ["ema.safetensors"]  # the default export is BAGEL's single file, no index
  del state["llm2vae.bias"]
  state["not_ours.weight"] = np.zeros(2, np.float32)
  state["language_model.model.layers.0.mlp_moe_gen.gate_proj.weight"] = np.zeros((3, 3), np.float32)
  save_file(state, os.path.join(out, "ema.safetensors"))  # BAGEL's single-file naming
  with pytest.raises(KeyMismatchError) as err:
    importers.import_bagel(out)
  msg = str(err.value)
  assert "missing: llm2vae.bias" in msg and "unexpected: not_ours.weight" in msg
  assert "mlp_moe_gen.gate_proj.weight: checkpoint has (3, 3)" in msg


def test_cli_orbax_export_import_round_trip(tiny_config, tmp_path):
  """tools/export_torch.py then tools/import_checkpoint.py: the restored params are bit-identical."""
  cfg = tiny_config
  params, tables = functional.init_params(cfg.model, 4)
  params = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.01), params)
  src, out, back = (str(tmp_path / n) for n in ("src", "export", "back"))
  orbax_io.save_params(os.path.join(src, "checkpoints"), 3, params, tables, cfg)  # --checkpoint=<workdir>
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, env=env, check=True, capture_output=True, text=True)
  run("tools/export_torch.py", f"--checkpoint={src}", f"--output={out}", "--dtype=float32", "--max_shard_gb=0.0002")
  run("tools/import_checkpoint.py", "--format=bagel", f"--source={out}", f"--output={back}", "--step=3")
  p2, t2, cfg2 = orbax_io.restore_params(back)
  assert cfg2.model.to_dict() == cfg.model.to_dict()
  # a non-empty --output (here: that import) is refused unless --overwrite replaces it
  again = subprocess.run([sys.executable, "tools/import_checkpoint.py", "--format=bagel", f"--source={out}",
                          f"--output={back}", "--step=5"], cwd=REPO, env=env, capture_output=True, text=True)
  assert_user_error(again, "import_checkpoint.py", f"--output {back} is not empty (it holds a training run)",
                    "--overwrite")
  assert orbax_io.finished_steps(back) == [3]
  run("tools/import_checkpoint.py", "--format=bagel", f"--source={out}", f"--output={back}", "--step=5", "--overwrite")
  assert orbax_io.finished_steps(back) == [5]
  assert jax.tree.structure(p2) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, p2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tables, t2)
  # and the mismatch path of the CLI: a missing tensor exits 2 with the list
  os.remove(os.path.join(out, safetensors_io.INDEX_NAME))
  first = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]
  os.remove(os.path.join(out, first))
  bad = subprocess.run([sys.executable, "tools/import_checkpoint.py", "--format=bagel", f"--source={out}",
                        f"--output={tmp_path / 'bad'}"], cwd=REPO, env=env, capture_output=True, text=True)
  assert_user_error(bad, "import_checkpoint.py", "missing")
  assert not os.path.exists(tmp_path / "bad")  # a failed import leaves nothing behind


def _release_folder(m, tmp_path, seed=2, name="bagel"):
  """Our export stripped to what a BAGEL release holds: llm/vit JSONs (no qk_norm), ema.safetensors."""
  import json

  params, tables = functional.init_params(m, seed)
  out = str(tmp_path / name)
  export.export_params(params, tables, m, out)
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["ema.safetensors"]
  for n in ("unimage_config.json", "vae_config.json"):
    os.remove(os.path.join(out, n))
  llm = json.load(open(os.path.join(out, "llm_config.json")))
  del llm["qk_norm"]  # BAGEL's loaders set it themselves; the release file need not say it
  json.dump(llm, open(os.path.join(out, "llm_config.json"), "w"))
  return params, tables, out


def test_bagel_release_layout_without_our_config(tiny_config, tmp_path):
  """BAGEL's release has llm/vit JSONs only (depth + 1 SigLIP layers named; no VAE config, no
  qk_norm): the shapes come from the tensors, q/k norms are on, the last ViT layer is kept."""
  import json

  m = tiny_config.model
  m.update(latent_channels=16, autoencoder="flux_vae", max_latent_grid=4)
  params, tables, out = _release_folder(m, tmp_path)
  assert json.load(open(os.path.join(out, "vit_config.json")))["num_hidden_layers"] == m.vit.num_layers + 1
  p2, t2, cfg = importers.import_bagel(out)
  assert (cfg.latent_channels, cfg.autoencoder, cfg.max_latent_grid, cfg.vit.num_layers, cfg.qk_norm) == (
      16, "flux_vae", 4, m.vit.num_layers, True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, p2)
  # the JSONs alone (no tensors consulted) follow BAGEL's conventions too
  from unimage_jax.interchange import hf_configs
  from_json = hf_configs.model_config_from_dir(out)
  assert from_json.qk_norm and from_json.vit.num_layers == m.vit.num_layers


def test_cli_imports_a_release_folder_and_config_only_adds_training_fields(tiny_config, tmp_path):
  """--config supplies training fields; the shape is the folder's; contradictions are listed."""
  m = tiny_config.model
  params, tables, out = _release_folder(m, tmp_path, seed=5)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  back = str(tmp_path / "back")
  subprocess.run([sys.executable, "tools/import_checkpoint.py", "--format=bagel", f"--source={out}",
                  "--config=tests/micro_config.py", "--config.train.steps=7", "--config.model.remat_policy=full",
                  f"--output={back}"], cwd=REPO, env=env, check=True, capture_output=True, text=True)
  p2, t2, cfg2 = orbax_io.restore_params(back)
  assert cfg2.train.steps == 7 and cfg2.model.remat_policy == "full"  # training / run fields: --config
  for f in importers.ARCHITECTURE_FIELDS:
    assert cfg2.model[f] == m[f], f
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, p2)
  # a --config whose shape contradicts the checkpoint is refused with every differing field
  bad = subprocess.run([sys.executable, "tools/import_checkpoint.py", "--format=bagel", f"--source={out}",
                        "--config=tests/micro_config.py", "--config.model.mlp_dim=96",
                        "--config.model.vit.num_layers=3", f"--output={tmp_path / 'bad'}"],
                       cwd=REPO, env=env, capture_output=True, text=True)
  assert_user_error(bad, "import_checkpoint.py", "config.model.mlp_dim=96 but the checkpoint has",
                    f"config.model.vit.num_layers=3 but the checkpoint has {m.vit.num_layers}")
  assert not os.path.exists(tmp_path / "bad")


def test_bagel_stock_vit_loader_builds_every_exported_layer(tiny_config, tmp_path):
  """BAGEL builds ``SiglipVisionModel`` from vit_config.json with ``num_hidden_layers - 1``: every
  exported ViT tensor must then load strictly (the last layer is not dropped)."""
  m = tiny_config.model
  params, tables = functional.init_params(m, 0)
  out = str(tmp_path / "export")
  export.export_params(params, tables, m, out)
  vit_cfg = transformers.SiglipVisionConfig.from_json_file(os.path.join(out, "vit_config.json"))
  vit_cfg.num_hidden_layers -= 1  # what BAGEL's app.py / inferencer do
  model = transformers.SiglipVisionModel(vit_cfg)
  reader = safetensors_io.SafetensorsReader(out)
  # BAGEL's keys are vit_model.vision_model.*; transformers 5.x names the module's keys without
  # the vision_model. prefix
  bare = not any(k.startswith("vision_model.") for k in model.state_dict())
  state = {}
  for k in reader.keys():
    if k.startswith("vit_model."):
      v = torch.from_numpy(np.array(reader[k]))
      if k.endswith("patch_embedding.weight"):  # BAGEL's Linear over (p, p, c) -> the stock conv
        p = vit_cfg.patch_size
        v = v.reshape(v.shape[0], p, p, 3).permute(0, 3, 1, 2)
      k = k.removeprefix("vit_model.")
      state[k.removeprefix("vision_model.") if bare else k] = v
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected, unexpected
  assert all("position_ids" in k or k.removeprefix("vision_model.").startswith("head.") for k in missing), missing
  tower = getattr(model, "vision_model", model)
  assert len(tower.encoder.layers) == m.vit.num_layers
  assert any(".layers.0.mlp.fc1.weight" in k for k in state)
