"""BAGEL-7B-MoT sizes (Qwen2-7B per expert, SigLIP so400m/14 with 26 layers, FLUX VAE latents)."""

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


# Whole films in one row (README "Context parallelism"): a 12-shot story with every keyframe's
# noised and clean latents. 512 px: 12 x 2 x 1,024 latent tokens; 1024 px: 12 x 2 x 4,096. Rows
# are split over the `sequence` axis in the zig-zag slot layout, whose chunks (buffer / 2S) are
# whole 512-token kernel blocks; the global batch keeps about as many tokens per step as stage 1.
LONG_ROWS = {
    # 28,672 tokens per row, 4 shards (v5p-128: fsdp 16 x sequence 4), 64 rows = 1.8M tokens
    "stage1_long": dict(data=dict(image_size=512, und_len=4096, gen_len=24576, batch_size=64), sequence=4),
    # 106,496 tokens per row, 8 shards (v5p-256: fsdp 16 x sequence 8), 16 rows = 1.7M tokens
    "stage1_long_1024": dict(data=dict(image_size=1024, und_len=8192, gen_len=98304, batch_size=16), sequence=8),
}


def get_config(stage: str = "stage1"):
  """``--config=configs/bagel_7b.py:stage2`` selects the stage-2 preset (docs/ARCHITECTURE.md §4);
  ``:stage1_long`` (512 px) and ``:stage1_long_1024`` stage 1 on whole 12-shot stories."""
  if stage in LONG_ROWS:
    c = get_config("stage1")
    c.data.update(slot_layout="zigzag", **LONG_ROWS[stage]["data"])
    # the director keeps the script and every clean keyframe of the film in its KV cache
    c.inference.cache_capacity = c.data.und_len + c.data.gen_len // 2
    c.mesh.update(data=1, fsdp=-1, sequence=LONG_ROWS[stage]["sequence"], tensor=1)
    c.train.workdir = f"runs/bagel_7b_{stage[len('stage1_'):]}"
    return c
  c = base_config()
  c.model.update(
      vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
      head_dim=128, mlp_dim=18944, rope_theta=1e6, rms_norm_eps=1e-6, param_dtype="bfloat16",
      compute_dtype="bfloat16", remat_policy="full", attention_impl="auto",
      autoencoder="flux_vae", latent_channels=16, max_latent_grid=64, timestep_shift=1.0,
  )
  c.model.vit.update(hidden_size=1152, num_layers=26, num_heads=16, mlp_dim=4304, patch_size=14)
  c.data.update(image_size=512, und_len=12288, gen_len=4096, vit_len=2048, max_segments=256,
                batch_size=128, **USER_DATA)
  c.model.vae_path = USER_VAE
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.optim.update(learning_rate=2e-5, warmup_steps=2000, ema_decay=0.9999)
  c.train.update(steps=100000, workdir="runs/bagel_7b")
  return apply_stage(c, stage)
