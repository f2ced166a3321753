"""Tiny MoT director: trains end to end on a 2-core CPU in minutes (the README's main job)."""

from unimage_jax.config_base import apply_stage, base_config


def get_config(stage: str = "stage1"):
  """``--config=configs/tiny.py:stage2`` selects the stage-2 preset (docs/ARCHITECTURE.md §4)."""
  c = base_config()
  # hidden 256 > the 192-dim latent tokens: the velocity head must carry the noise through
  # x0 head + x0 loss; training shift 10: ~80% of flow samples at t > 0.8, where the picture must
  # come from the context (the sampler keeps shift 3; README, "Diagnosing the keyframes")
  c.model.update(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                 mlp_dim=768, vocab_size=1024, compute_dtype="float32",
                 flow_prediction="x0", timestep_shift=10.0,
                 scan_layers=False)  # 2 layers: unrolled is faster on the CPU (BENCHMARKS.md)
  # rows hold whole 12-shot stories (512-slot rows cut every story after ~8 shots, so later tags
  # and story ends were never trained); two noised copies per keyframe (README, "Diagnosing");
  # 576 gen slots hold a 12-shot story's 36 images: the packed rows used 491 of 768 on average
  # (485 of 576), so the 192 slots cut were padding (BENCHMARKS.md, "data parallel")
  c.data.update(batch_size=2, und_len=1024, gen_len=576, max_segments=96, noised_copies=2)
  # header samples (prompt, cast and place lines alone): the lines that copy the prompt's names
  # get 1.5x the examples per step for 13% of the gen slots; measured on 20 held-out prompts:
  # "cast = prompt names" 0.05 -> 0.50 (README, "Diagnosing the keyframes"; weight 2 did not
  # separate from the seed-to-seed spread at 1,500 steps)
  c.data.tasks.header = 1.0
  # the cast lines' name tokens weigh 12x in the cross-entropy: on 20 held-out prompts "cast =
  # prompt names" 0.65 -> 1.00, teacher-forced P(true name) 0.68 -> 0.99 (weight 5: 0.60 / 0.69;
  # README, "Diagnosing the keyframes")
  c.data.name_loss_weight = 12.0
  # opening samples (header + the noised first keyframe, the one shot the header alone fixes):
  # the image tokens learn to read the cast and place lines; at 900 steps the place drawn from
  # the context alone 0.75 -> 0.87, free-run place 0.57 -> 0.59 (README, "Diagnosing")
  c.data.tasks.opening = 1.0
  # the keyframe caption: the shot's <EnvironmentK> line, no loss, right before every noised
  # keyframe (the director writes it too); on 20 held-out prompts at 1,500 steps, place accuracy
  # 0.57 -> 1.00 (where the place changes 0.21 -> 1.00), agreement 0.30 -> 0.50 (README, "Diagnosing")
  c.data.keyframe_caption = "place"
  # no EMA: on the main job's checkpoint the raw params draw better than an EMA at 0.99 (place
  # 0.31 -> 0.40, identity 0.45 -> 0.55 on 20 held-out prompts; README, "Diagnosing")
  c.optim.update(learning_rate=3e-3, ema_decay=0.0)
  # 1,250 steps: the main job within its 15 minutes on the slower of the 2-core hosts measured
  # (0.51-0.61 s a step on an AMD EPYC; 1,500 steps took 17.6 minutes with set-up there, 11 on an
  # AMX Xeon; README, "Evaluation": 1,250 against 1,500 steps on that host, within their spread)
  c.train.update(steps=1250, log_every=25, checkpoint_every=250)
  # 2 sampler timesteps (one Euler step from t = 1: the model's clean-image estimate from the
  # context alone); on the main job's checkpoint over 20 held-out prompts, against 6 steps:
  # agreement 0.237 -> 0.282, identity 0.665 -> 0.763, place 0.533 -> 0.574 (README, "Diagnosing")
  c.inference.num_steps = 2
  # up to 3 samples for a script valid as written before a repaired one is taken (README, "The director")
  c.inference.valid_attempts = 3
  return apply_stage(c, stage)
