"""Impossible configs are refused before anything is traced, naming every offending field."""

import pytest

from unimage_jax.config_loading import load_config
from unimage_jax.config_validation import ConfigError, validate_config


@pytest.mark.parametrize("path", ["configs/tiny.py", "configs/tiny_vae.py", "configs/mot_1b.py", "configs/bagel_7b.py",
                                  "configs/bagel_7b.py:stage1_long", "configs/bagel_7b.py:stage1_long_1024"])
def test_shipped_configs_are_valid(path):
  validate_config(load_config(path))


@pytest.mark.parametrize("overrides,message", [
    ({"model.num_kv_heads": 3}, "config.model.num_heads=4 must be divisible by config.model.num_kv_heads=3"),
    ({"model.hidden_size": 130}, "config.model.hidden_size=130 must be divisible by config.model.num_heads=4"),
    ({"model.head_dim": 33}, "config.model.head_dim=33 must be even"),
    ({"model.compute_dtype": "float8"}, "config.model.compute_dtype='float8' must be one of"),
    ({"model.remat_policy": "some"}, "config.model.remat_policy='some'"),
    ({"model.attention_impl": "cuda"}, "config.model.attention_impl='cuda'"),
    ({"model.latent_channels": 16}, "must equal 3 * pixel_downsample**2"),
    ({"data.vit_len": 4096}, "config.data.vit_len=4096 cannot exceed config.data.und_len"),
    ({"data.image_size": 30}, "config.data.image_size=30 must be divisible by"),
    ({"data.image_size": 128}, "larger than config.model.max_latent_grid"),
    ({"data.gen_len": 8}, "config.data.gen_len=8 cannot hold one"),
    ({"data.text_cond_dropout": 1.5}, "config.data.text_cond_dropout=1.5 must be a probability"),
    ({"optim.learning_rate": -1.0}, "config.optim.learning_rate=-1.0 must be positive"),
    ({"optim.frozen_groups": ["vision"]}, "unknown groups ['vision']"),
    ({"train.grad_accum_steps": 3}, "must be divisible by config.train.grad_accum_steps=3"),
    ({"model.vocab_size": 0}, "config.model.vocab_size=0 must be positive"),
    ({"train.keep_checkpoints": 0}, "config.train.keep_checkpoints=0 must be >= 1"),
    ({"train.log_every": 0}, "config.train.log_every=0 must be >= 1"),
    ({"train.checkpoint_every": -1}, "config.train.checkpoint_every=-1 must be >= 0"),
    ({"inference.temperature": -1.0}, "config.inference.temperature=-1.0 must be >= 0 (0 = greedy)"),
    ({"inference.top_p": 0.0}, "config.inference.top_p=0.0 must be in (0, 1]"),
    ({"inference.top_k": -2}, "config.inference.top_k=-2 must be >= 0"),
    ({"inference.cache_capacity": 40}, "config.inference.cache_capacity=40 cannot hold one 32px keyframe"),
    ({"inference.num_steps": 1}, "config.inference.num_steps=1 must be >= 2"),
    ({"inference.max_attempts": 0}, "config.inference.max_attempts=0 must be >= 1"),
    ({"inference.valid_attempts": 0}, "config.inference.valid_attempts=0 must be >= 1"),
    ({"inference.cfg_interval": (0.8, 0.2)}, "config.inference.cfg_interval=(0.8, 0.2) must be two numbers"),
    ({"inference.cfg_renorm_type": "norm"}, "config.inference.cfg_renorm_type='norm' must be one of"),
    ({"inference.mode": "both"}, "config.inference.mode='both' must be one of"),
])
def test_bad_values_are_named(overrides, message):
  with pytest.raises(ConfigError) as e:
    validate_config(load_config("configs/tiny.py", overrides))
  assert message in str(e.value)


def test_all_problems_reported_at_once():
  with pytest.raises(ConfigError) as e:
    validate_config(load_config("configs/tiny.py", {"model.num_kv_heads": 3, "optim.learning_rate": 0.0}))
  assert "num_kv_heads" in str(e.value) and "learning_rate" in str(e.value)


def test_errors_print_on_one_line():
  from unimage_jax.errors import one_line
  with pytest.raises(ConfigError) as e:
    validate_config(load_config("configs/tiny.py", {"train.log_every": 0, "inference.top_p": 2.0}))
  line = one_line(e.value)
  assert "\n" not in line and line.startswith("invalid config: config.train.log_every=0")
  assert "; config.inference.top_p=2.0 must be in (0, 1]" in line


def test_zigzag_chunks_must_be_whole_attention_tiles():
  """buffer / (2 * sequence) slots per chunk: a tile across two chunks mixes early and late tokens."""
  zig = {"mesh.sequence": 2, "data.slot_layout": "zigzag", "data.und_len": 512, "data.gen_len": 256}
  with pytest.raises(ConfigError) as e:
    validate_config(load_config("configs/tiny.py", {**zig, "model.attention_impl": "pallas_tpu"}))
  assert ("config.data.und_len=512 gives zig-zag chunks of 128 slots (config.data.und_len / (2 * "
          "config.mesh.sequence=2)), not whole 512-slot attention tiles of config.model.attention_impl='pallas_tpu'"
          in str(e.value))
  assert "config.data.gen_len=256 gives zig-zag chunks of 64 slots" in str(e.value)
  with pytest.raises(ConfigError, match=r"gen_len=256 gives .* tiles of config.model.context_parallel='ring'"):
    validate_config(load_config("configs/tiny.py", {**zig, "model.attention_impl": "xla",
                                                    "model.context_parallel": "ring"}))
  validate_config(load_config("configs/tiny.py", {**zig, "model.attention_impl": "xla_flash", "data.gen_len": 512}))
  validate_config(load_config("configs/tiny.py", {**zig, "model.attention_impl": "xla"}))  # the reference skips nothing
  validate_config(load_config("configs/tiny.py", {**zig, "model.attention_impl": "pallas_tpu", "data.und_len": 256,
                                                  "data.gen_len": 256}))  # one 512-slot tile per row


def test_every_enumerated_choice_is_implemented():
  """unimage_jax/choices.py names the accepted values; the jax modules that implement them agree."""
  from unimage_jax import choices
  from unimage_jax.attention import dispatch
  from unimage_jax.inference import flow
  from unimage_jax.model import stacking
  assert tuple(stacking.REMAT_POLICIES) == choices.REMAT_POLICIES
  for backend in ("cpu", "gpu", "tpu"):
    assert {dispatch.resolve_impl(impl, backend) for impl in choices.ATTENTION_IMPLS} <= set(choices.ATTENTION_IMPLS)
  # each guidance renorm is its own rule in the sampler: no two choices give the same guided velocity
  import itertools
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  v, v_text, v_img = (jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) for _ in range(3))
  guided = [np.asarray(flow.guided_velocity(v, v_text, v_img, jnp.float32(0.8),
                                            flow.GuidanceParams(text_scale=6.0, img_scale=2.0, renorm_type=r)))
            for r in choices.RENORM_TYPES]
  assert not any(np.allclose(a, b) for a, b in itertools.combinations(guided, 2))
