"""Tiny MoT director: trains end to end on a 2-core CPU in minutes (the README's main job)."""

from unimage_jax.config_base import apply_stage, base_config


def get_config(stage: str = "stage1"):
  """``--config=configs/tiny.py:stage2`` selects the stage-2 preset (docs/ARCHITECTURE.md §4)."""
  c = base_config()
  # hidden 256 > the 192-dim latent tokens: the velocity head must carry the noise through
  # x0 head + x0 loss, training t at the sampler's shift (README, "Diagnosing the keyframes")
  c.model.update(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                 mlp_dim=768, vocab_size=1024, compute_dtype="float32",
                 flow_prediction="x0", timestep_shift=3.0,
                 scan_layers=False)  # 2 layers: unrolled is faster on the CPU (BENCHMARKS.md)
  c.data.batch_size = 4  # more, smaller steps learn more in the main job's minutes than 8-row ones
  c.optim.learning_rate = 2e-3
  c.train.update(steps=600, log_every=20, checkpoint_every=200)
  return apply_stage(c, stage)
