"""The tiny config shrunk further so each compile takes seconds on 2 cores (tests only)."""

from unimage_jax.config_loading import load_config


def get_config():
  c = load_config("configs/tiny.py")
  c.model.update(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                 vocab_size=128, compute_dtype="float32", max_latent_grid=4, latent_channels=48,
                 attention_impl="xla")  # the reference: fastest to compile at these sizes
  c.model.vit.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=4)
  c.data.update(dataset="synthetic", und_len=96, gen_len=48, vit_len=16, max_segments=32, batch_size=2,
                image_size=16)
  c.data.noised_copies = 1
  c.optim.ema_decay = 0.0
  c.train.update(log_every=1, checkpoint_every=0)
  return c
