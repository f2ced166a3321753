"""Tiny director on the real path: FLUX-architecture VAE latents and an HF tokenizer.json.

What it uses (all built on a fresh clone's first run, no download):
* StoryWorld at 64 px (1000 stories), as ``configs/tiny.py`` but at the VAE's resolution;
* an HF byte-level BPE ``tokenizer.json`` trained on StoryWorld (``<data_dir>/../tokenizer/hf``),
  the same interface as Qwen2's (BAGEL's) tokenizer;
* a FLUX-architecture VAE (4 levels, 8x down, 16 latent channels; 16/32/32/32 wide, about 0.2M
  parameters) trained on StoryWorld keyframes for 400 steps (``unimage_jax/vae/training.py``,
  ``<data_dir>/../vae/storyworld_64px``). Point ``--config.model.vae_path`` at an imported FLUX
  VAE (``tools/import_checkpoint.py --format=vae``) to use real FLUX weights instead;
* keyframe latents from the offline ArrayRecord cache (``tools/cache_latents.py``, built on first
  use): 64 px -> 8x8x16 latents -> 16 tokens of 64 dims per keyframe.
"""

from unimage_jax.config_base import apply_stage, base_config


def get_config(stage: str = "stage1"):
  """``--config=configs/tiny_vae.py:stage2`` selects the stage-2 preset (docs/ARCHITECTURE.md §4)."""
  c = base_config()
  c.model.update(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768,
                 vocab_size=1024, compute_dtype="float32", autoencoder="flux_vae", latent_channels=16,
                 vae_downsample=8, max_latent_grid=8, vae_path="artifacts/vae/storyworld_64px")
  c.data.update(image_size=64, tokenizer_path="artifacts/tokenizer/hf/tokenizer.json")
  c.train.update(steps=300, log_every=20, checkpoint_every=100, workdir="runs/tiny_vae")
  return apply_stage(c, stage)
