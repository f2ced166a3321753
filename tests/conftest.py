"""Test setup: CPU only, 8 host devices for sharding tests, x64 off."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import pytest  # noqa: E402

from unimage_jax.config_loading import load_config  # noqa: E402


@pytest.fixture
def tiny_config():
  """The tiny config shrunk further so each compile takes seconds on 2 cores."""
  c = load_config("configs/tiny.py")
  c.model.update(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                 vocab_size=128, compute_dtype="float32", max_latent_grid=4, latent_channels=48)
  c.model.vit.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=4)
  c.data.update(und_len=96, gen_len=48, vit_len=16, max_segments=32, batch_size=2, image_size=16)
  return c
