"""Defaults shared by every config file in ``configs/``; each file overrides what differs.

Keeping one place for field names means a typo in a sweep override fails loudly
(ml_collections ConfigDicts are locked against unknown keys).
"""

from __future__ import annotations

import ml_collections
from absl import logging

from unimage_jax import config_text


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- model (docs/ARCHITECTURE.md §3)
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 1024
  m.hidden_size = 128
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 384
  m.rope_theta = 1_000_000.0
  m.rms_norm_eps = 1e-6
  m.qk_norm = True  # BAGEL's und/gen experts use per-head q/k RMSNorm
  m.param_dtype = "float32"
  m.compute_dtype = "bfloat16"
  m.scan_layers = True
  m.remat_policy = "none"  # none | full | dots_saveable | save_attention_out
  m.attention_impl = "auto"  # xla (reference) | xla_flash | pallas_tpu | pallas_gpu | auto
  m.attention_query_chunk = 1024  # reference attention: queries per score tile
  # rows split over mesh.sequence: all_gather (K/V gathered, any attention_impl) | ring (K/V passed
  # around the axis with ppermute; XLA flash tiles, attention_impl xla or xla_flash)
  m.context_parallel = "all_gather"
  m.ce_chunk = 2048  # tokens per device per logits chunk in the CE loss (no [L, vocab] tensor)
  # image latents: "pixel" (exact space-to-depth stand-in, tiny configs) or "flux_vae"
  m.autoencoder = "pixel"
  m.pixel_downsample = 4
  m.latent_channels = 48  # 16 for the FLUX VAE; 3 * pixel_downsample**2 for the pixel path
  m.latent_patch_size = 2
  # flux_vae: the VAE weights (tools/import_checkpoint.py --format=vae output, a FLUX ae.safetensors
  # or a diffusers vae folder) and its downsampling (2 ** (levels - 1); FLUX: 8)
  m.vae_path = ""
  m.vae_downsample = 8
  m.max_latent_grid = 8  # G: latent_pos_embed has G*G entries
  m.timestep_shift = 1.0  # s in shift(t) = s t / (1 + (s - 1) t)
  m.flow_prediction = "velocity"  # velocity (BAGEL) | x0: the gen head predicts the clean latent
  m.flow_loss = "auto"  # auto (= flow_prediction) | velocity | x0: the space the flow MSE is measured in
  # understanding images: SigLIP-style NaViT encoder + 2-layer GELU-tanh connector
  v = m.vit = ml_collections.ConfigDict()
  v.enabled = True
  v.hidden_size = 64
  v.num_layers = 2
  v.num_heads = 2
  v.mlp_dim = 128
  v.patch_size = 8
  v.max_patches_per_side = 70  # vit_pos_embed is [70*70, hidden]
  v.layer_norm_eps = 1e-6

  # ---------------------------------------------------------------- data (docs/ARCHITECTURE.md §6)
  d = c.data = ml_collections.ConfigDict()
  d.dataset = "storyworld"  # storyworld | storyboards | synthetic (in-memory random rows)
  d.synthetic_pool = 4  # distinct batches cycled by the synthetic source
  d.dataset_config = ""  # built TFDS config to read ("" = the only one under data_dir/dataset)
  d.num_stories = 1000  # StoryWorld stories built by data_pipelines.pipeline.ensure_dataset
  d.data_dir = "artifacts/data"
  d.tokenizer_path = "artifacts/tokenizer/spm.model"  # a SentencePiece .model, or an HF tokenizer.json / folder
  # flux_vae: keyframe latents come from an offline cache (tools/cache_latents.py; built on first
  # use); "" = <data_dir>/../latents
  d.latent_cache_dir = ""
  d.image_size = 32
  d.batch_size = 8  # global packed rows per step
  d.und_len = 512  # Lu
  d.gen_len = 256  # Lg
  d.vit_len = 64  # Nv
  d.max_segments = 64
  d.seed = 0
  d.num_workers = 0
  d.prefetch_buffer_size = 2
  d.pack_open_rows = 8  # first-fit packing: rows kept open at once
  d.pack_max_age = 64  # a row closes once its oldest sample has waited this many samples
  d.pack_min_keep = 0.5  # a row tail may take a sample cut to >= this fraction of its tokens (1 = never cut)
  d.sqrt_length_loss_weighting = False
  # interleaved task: noised copies of each keyframe (each its own t and noise, all seeing the same
  # context, none seen): more flow-loss samples per encoded context (as MAR's diffusion batch)
  d.noised_copies = 1
  # interleaved task: noised copies of a keyframe whose place differs from the previous shot's
  # (0: noised_copies): more loss where copying the previous keyframe's place is wrong
  d.place_change_copies = 0
  # every task: a no-loss text right before each noised keyframe, which the director writes too:
  # the definition lines of what the shot's frame line names (none | place | subject_place |
  # cast_place; prompt_layout.caption_lines), the description one read from the picture
  d.keyframe_caption = "none"
  # context parallelism: the slots each sequence shard holds. contiguous: piece i of each buffer;
  # zigzag: chunks i and 2S-1-i of 2S (evens the causal-like attention work; README "Context
  # parallelism"); needs und_len and gen_len divisible by 2 * mesh.sequence
  d.slot_layout = "contiguous"
  # task mixture (stage 1: interleaved, optionally header; stage 2: script + keyframe). Weights
  # are per story drawn; header samples are the interleaved layout's first text alone
  d.tasks = ml_collections.ConfigDict({"interleaved": 1.0, "script": 0.0, "keyframe": 0.0, "header": 0.0,
                                      "opening": 0.0, "subject": 0.0})
  d.subject_alone = 0.0  # subject task: probability that the subject's cast line is the only one
  # subject task: probability that the frame line spells the subject out (its cast line in place
  # of <CharacterK>; a diagnostic without the tag lookup, README "Diagnosing the keyframes")
  d.subject_spelled_out = 0.0
  # loss weight of the labels that are a cast line's name (<CharacterK>: Name): copying the
  # prompt's names is a few tokens of each text (README, "Diagnosing the keyframes")
  d.name_loss_weight = 1.0
  # flow-loss weight of the character pixels of a noised StoryWorld keyframe (a token weighs
  # 1 + (W - 1) x its share of them); the places fill most pixels (README, "Diagnosing the keyframes")
  d.character_loss_weight = 1.0
  d.precontext_split_prob = 0.5
  d.text_cond_dropout = 0.1
  d.vit_cond_dropout = 0.3
  d.vae_cond_dropout = 0.1
  d.use_vit_context = False

  # ---------------------------------------------------------------- loss
  lo = c.loss = ml_collections.ConfigDict()
  lo.ce_weight = 1.0
  lo.mse_weight = 1.0

  # ---------------------------------------------------------------- optimisation
  o = c.optim = ml_collections.ConfigDict()
  o.learning_rate = 1e-3
  o.warmup_steps = 20
  o.schedule = "cosine"  # cosine | constant | linear
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-15
  o.weight_decay = 0.0
  o.grad_clip_norm = 1.0
  o.ema_decay = 0.0  # 0 disables EMA
  # parameter groups that do not train (optax masks): und_expert, gen_expert, embeddings, lm_head,
  # latent_io, connector, vit (see unimage_jax/training/optimizer.py)
  o.frozen_groups = ["vit"]
  # per-loss parameter groups (stage 2): {"ce": [...groups...], "mse": [...]}; empty = every loss
  # reaches every trainable group
  o.loss_groups = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- training
  t = c.train = ml_collections.ConfigDict()
  t.steps = 200
  t.seed = 0
  t.log_every = 10
  t.workdir = "runs/tiny"
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.grad_accum_steps = 1
  t.init_from = ""  # a finished run's workdir: start from its params (stage 2 from stage 1)
  t.nonfinite = "skip"  # skip: drop the update and count it | stop: abort with a message
  # "a,b": a jax.profiler trace of steps a..b (1-based, inclusive) into <workdir>/profile; "" = off
  t.profile_steps = ""
  # the data position on resume: auto (exact with the same process count, elastic with another:
  # see README "Elastic data resume") | restart (the data stream starts over; stories repeat)
  t.data_resume = "auto"

  # ---------------------------------------------------------------- inference (the director)
  inf = c.inference = ml_collections.ConfigDict()
  inf.mode = "auto"  # auto (from data.tasks) | interleaved | disentangled
  inf.cache_capacity = 1536  # KV-cache slots per row (static)
  inf.max_script_tokens = 768  # disentangled: tokens for the whole script
  inf.max_chunk_tokens = 192  # interleaved: tokens per text segment
  inf.temperature = 0.7
  inf.top_k = 0
  inf.top_p = 0.95
  inf.num_steps = 24  # timesteps of the Euler sampler (N - 1 steps)
  inf.timestep_shift = 3.0
  inf.cfg_text_scale = 2.0
  inf.cfg_img_scale = 1.5
  inf.cfg_interval = (0.0, 1.0)
  inf.cfg_renorm_type = "global"  # global | channel | text_channel
  inf.cfg_renorm_min = 0.0
  inf.max_attempts = 6  # resample with the next seed when a script cannot be repaired
  # the first attempts look for a script valid as written (a repairable one is the fallback); 1 = take
  # the first repairable script
  inf.valid_attempts = 1
  # after the header, sample only the ID tags the schema allows (defined characters and places,
  # the next <FrameN>); see unimage_jax/inference/schema_constraints.py
  inf.schema_constrained = True

  # ---------------------------------------------------------------- mesh and sharding (section 8)
  s = c.mesh = ml_collections.ConfigDict()
  s.data = -1  # -1: whatever devices remain
  s.fsdp = 1
  s.tensor = 1
  # context parallelism: every row's und and gen buffers are cut into `sequence` pieces, one per
  # device of the axis (the 'length' rule below); attention all-gathers K/V over it (README
  # "Context parallelism"). und_len and gen_len must be divisible by it
  s.sequence = 1
  # slices over the data-centre network (multi-slice TPU): the mesh's data axis is data * dcn_data,
  # its fsdp axis fsdp * dcn_fsdp; data/fsdp/tensor above are the sizes inside one slice (ICI)
  s.dcn_data = 1
  s.dcn_fsdp = 1
  # logical axis -> mesh axes (MaxText-style rules); the first matching rule wins. Parameter names
  # first, then the activation names (batch, length, act_*) that with_sharding_constraint and the
  # attention kernel's shard_map read (unimage_jax/model/constraints.py)
  c.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("layers", None),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("mlp", "tensor"),
      ("latent", None),
      ("vit_embed", "fsdp"),
      ("vit_mlp", "tensor"),
      ("vit_heads", "tensor"),
      ("vit_patch", None),
      ("timestep", None),
      ("norm", None),
      ("length", "sequence"),  # rows split over the sequence axis (a no-op while mesh.sequence = 1)
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_kv_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  ]
  return c


STAGES = ("stage1", "stage2")


def apply_stage(c: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The curriculum of docs/ARCHITECTURE.md §4 as config presets; logs (warning) every field it changes.

  stage1, Interleaved Concept Learning: whole scripts with their keyframes, both losses, all but
  the ViT trainable; nothing changes. stage2, Disentangled Expert Learning: script writing (text,
  pre-context splits) and keyframe generation (script + earlier keyframes -> next keyframe,
  conditioning dropout) mixed; CE trains the und expert, embeddings and lm_head, the flow loss
  trains the gen expert and the latent heads. Start it from a stage-1 run with
  ``--config.train.init_from=<stage-1 workdir>``. Besides the task weights and
  ``optim.loss_groups``, stage2 changes two values a reader of the config file does not see:

  * ``data.gen_len`` is halved and ``data.und_len`` takes the freed slots (rows give more slots
    to text; the row length stays): configs/tiny.py's 1024 + 768 becomes 1408 + 384;
  * ``train.workdir`` gets the suffix ``_stage2`` (``runs/tiny`` -> ``runs/tiny_stage2``).

  ``tools/show_config.py --config=configs/tiny.py:stage2`` prints the resulting values.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES} (e.g. --config=configs/tiny.py:stage2)")
  if stage == "stage2":
    before = config_text.flatten(c)
    c.data.tasks.update(interleaved=0.0, script=0.5, keyframe=0.5, header=0.0, opening=0.0, subject=0.0)
    total = c.data.und_len + c.data.gen_len
    c.data.gen_len = max(c.data.gen_len // 2, 1)
    c.data.und_len = total - c.data.gen_len
    c.optim.loss_groups = ml_collections.ConfigDict(
        {"ce": ["und_expert", "embeddings", "lm_head"], "mse": ["gen_expert", "latent_io", "connector"]})
    c.train.workdir = c.train.workdir.rstrip("/") + "_stage2"
    logging.warning("the %s preset changed %s", stage, "; ".join(config_text.changes(before, config_text.flatten(c))))
  return c
