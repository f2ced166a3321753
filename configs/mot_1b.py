"""About 1B active parameters per token (2 x 0.77B expert layers + 0.31B embed/head): one GPU."""

from unimage_jax.config_base import apply_stage, base_config

# What the user supplies (the real path; README "The real path" and "The users' recipe"):
# * tokenizer: the Qwen2/BAGEL checkpoint folder holding tokenizer.json (ID tags, cue brackets and
#   image markers are appended as special tokens when missing);
# * VAE: FLUX's VAE imported once with
#   tools/import_checkpoint.py --format=vae --source=<FLUX ae.safetensors> --output=artifacts/vae/flux
#   (the keyframe latent cache is then built from it on the first training run);
# * data: their storyboards (tools/build_data.py --dataset=storyboards --jsonl=... --image_dir=...).
USER_DATA = dict(dataset="storyboards", tokenizer_path="artifacts/tokenizer/qwen2")
USER_VAE = "artifacts/vae/flux"


def get_config(stage: str = "stage1"):
  """``--config=configs/mot_1b.py:stage2`` selects the stage-2 preset (docs/ARCHITECTURE.md §4)."""
  c = base_config()
  c.model.update(
      vocab_size=152064, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4,
      head_dim=128, mlp_dim=6144, rope_theta=1e6, param_dtype="float32",
      compute_dtype="bfloat16", remat_policy="dots_saveable", attention_impl="auto",
      autoencoder="flux_vae", latent_channels=16, max_latent_grid=64,
  )
  c.model.vit.update(hidden_size=1152, num_layers=26, num_heads=16, mlp_dim=4304, patch_size=14)
  c.data.update(image_size=256, und_len=4096, gen_len=4096, vit_len=1024, max_segments=128,
                batch_size=8, **USER_DATA)
  c.model.vae_path = USER_VAE
  c.optim.update(learning_rate=3e-4, warmup_steps=500)
  c.train.update(steps=10000, workdir="runs/mot_1b")
  return apply_stage(c, stage)
