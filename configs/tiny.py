"""Tiny MoT director: trains end to end on a 2-core CPU in minutes (the README's main job)."""

from unimage_jax.config_base import base_config


def get_config():
  c = base_config()
  c.model.update(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384, vocab_size=1024, compute_dtype="float32")
  return c
