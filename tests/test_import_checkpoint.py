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
  os.remove(os.path.join(out, safetensors_io.INDEX_NAME))
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


def test_bagel_release_layout_without_our_config(tiny_config, tmp_path):
  """BAGEL's release has llm/vit JSONs only (27 SigLIP layers named, 26 kept; no VAE config)."""
  import json

  m = tiny_config.model
  m.update(latent_channels=16, autoencoder="flux_vae", max_latent_grid=4)
  params, tables = functional.init_params(m, 2)
  out = str(tmp_path / "bagel")
  export.export_params(params, tables, m, out)
  for name in ("unimage_config.json", "vae_config.json"):
    os.remove(os.path.join(out, name))
  vit = json.load(open(os.path.join(out, "vit_config.json")))
  vit["num_hidden_layers"] += 1
  json.dump(vit, open(os.path.join(out, "vit_config.json"), "w"))
  p2, t2, cfg = importers.import_bagel(out)
  assert (cfg.latent_channels, cfg.autoencoder, cfg.max_latent_grid, cfg.vit.num_layers) == (16, "flux_vae", 4, 1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, p2)
