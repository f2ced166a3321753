"""The Flax SigLIP tower (model/vit.py) against transformers' SiglipVisionModel, weights imported."""

import numpy as np
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimage_jax.interchange import importers  # noqa: E402
from unimage_jax.interchange.keymap import KeyMismatchError  # noqa: E402
from unimage_jax.model import functional  # noqa: E402

PATCH, GRID = 4, 4  # 16x16 images, a 4x4 patch grid


def _hf_siglip(tmp_path):
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, patch_size=PATCH, image_size=PATCH * GRID,
                                        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(cfg).eval().float()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path / "siglip")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _patchify(img: np.ndarray) -> np.ndarray:
  """[3, H, W] -> [h*w, p*p*3] in (p, p, c) order, row-major patches."""
  c, h, w = img.shape
  x = img.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).transpose(1, 3, 2, 4, 0)
  return x.reshape(-1, PATCH * PATCH * c)


def test_siglip_tower_matches_transformers(tiny_config, tmp_path):
  hf, path = _hf_siglip(tmp_path)
  m = tiny_config.model
  m.vit.update(hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, patch_size=PATCH,
               max_patches_per_side=GRID, layer_norm_eps=1e-6)
  base = functional.init_params(m, 0)
  # HF has 3 layers and a pooling head: BAGEL-style import keeps the first 2 and drops the head
  params, tables = importers.import_siglip(path, m, base)
  model = functional.model_def(m).bind(params, tables)

  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, PATCH * GRID, PATCH * GRID)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images), output_hidden_states=True)
  # our output after 2 layers + post_layernorm == HF's hidden state after layer 2, post-normed
  with torch.no_grad():
    tower = getattr(hf, "vision_model", hf)  # transformers 5 flattened the wrapper
    expected = tower.post_layernorm(out.hidden_states[2]).numpy()  # [2, 16, 32]

  n = GRID * GRID
  pad = 5
  patches = np.concatenate([_patchify(images[0]), _patchify(images[1]), np.zeros((pad, PATCH * PATCH * 3))])
  rows, cols = np.divmod(np.arange(n), GRID)
  pos = np.concatenate([rows * GRID + cols] * 2 + [np.zeros(pad, int)])
  image_ids = np.concatenate([np.zeros(n, int), np.ones(n, int), -np.ones(pad, int)])
  got = model.vit_model(jnp.asarray(patches[None], jnp.float32), jnp.asarray(pos[None], jnp.int32),
                        jnp.asarray(image_ids[None], jnp.int32), jnp.float32)
  got = np.asarray(got)[0]
  np.testing.assert_allclose(got[:n], expected[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[n:2 * n], expected[1], atol=1e-4, rtol=1e-4)
  assert np.abs(expected[0] - expected[1]).max() > 0.1  # images differ: packing did not mix them


def test_siglip_full_depth_and_mismatch_report(tiny_config, tmp_path):
  hf, path = _hf_siglip(tmp_path)
  m = tiny_config.model
  m.vit.update(hidden_size=32, mlp_dim=64, num_layers=3, num_heads=2, patch_size=PATCH,
               max_patches_per_side=GRID, layer_norm_eps=1e-6)
  params, tables = importers.import_siglip(path, m, functional.init_params(m, 0))
  model = functional.model_def(m).bind(params, tables)
  images = np.random.default_rng(1).uniform(-1, 1, (1, 3, PATCH * GRID, PATCH * GRID)).astype(np.float32)
  with torch.no_grad():
    expected = hf(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()[0]
  n = GRID * GRID
  rows, cols = np.divmod(np.arange(n), GRID)
  got = model.vit_model(jnp.asarray(_patchify(images[0])[None]), jnp.asarray((rows * GRID + cols)[None]),
                        jnp.zeros((1, n), jnp.int32), jnp.float32)
  np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-4, rtol=1e-4)

  m.vit.update(num_layers=4, mlp_dim=48)
  with pytest.raises(KeyMismatchError) as err:
    importers.import_siglip(path, m, functional.init_params(m, 0))
  msg = str(err.value)
  assert "missing" in msg and "encoder.layers.3" in msg
  m.vit.update(num_layers=3)
  with pytest.raises(KeyMismatchError, match="wrong shape"):
    importers.import_siglip(path, m, functional.init_params(m, 0))
