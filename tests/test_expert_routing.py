"""Hard routing: each buffer is computed only by its own expert's weights.

With one layer, weights that act per token (q_proj, o_proj, post-attention norm, MLP, final norm)
must move only their own buffer's outputs. k/v projections feed the *joint* attention, so they
legitimately move both buffers (und text is the context of the image tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax import synthetic
from unimage_jax.model import functional

PER_TOKEN = [("self_attn", "q_proj", "kernel"), ("self_attn", "o_proj", "kernel"),
             ("post_attention_layernorm", "weight"), ("mlp", "up_proj", "kernel"), ("mlp", "down_proj", "kernel")]


@pytest.fixture
def setup(tiny_config):
  tiny_config.model.num_layers = 1
  cfg = tiny_config.model
  params, tables = functional.init_params(cfg, 0)
  params = jax.tree.map(np.asarray, params)
  params["llm2vae"]["kernel"] = np.random.default_rng(0).normal(size=params["llm2vae"]["kernel"].shape).astype(np.float32)
  batch = {k: jnp.asarray(v) for k, v in synthetic.random_batch(tiny_config, seed=1).items()}
  mdef = functional.model_def(cfg)

  @jax.jit
  def forward(params):
    model = mdef.bind(params, tables)
    hidden, velocity = model(batch, batch["gen_latents"], jnp.full(batch["gen_latent_pos"].shape, 0.5))
    return model.logits(hidden), velocity

  und_valid = np.asarray(batch["und_segment_kinds"]) > 0
  gen_valid = np.asarray(batch["gen_segment_kinds"]) > 0
  assert und_valid.sum() > 10 and gen_valid.sum() > 4
  return params, forward, und_valid, gen_valid


def _perturb(params, path):
  p = jax.tree.map(np.copy, params)
  node = p
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = node[path[-1]] + 0.5
  return p


def _moved(a, b, valid):
  return float(np.abs(np.asarray(a) - np.asarray(b))[valid].max())


@pytest.mark.parametrize("leaf", PER_TOKEN + [("final_norm",)])
@pytest.mark.parametrize("expert", ["und", "gen"])
def test_per_token_weights_move_only_their_buffer(setup, expert, leaf):
  params, forward, und_valid, gen_valid = setup
  if leaf == ("final_norm",):
    path = ("decoder", "norm" if expert == "und" else "norm_moe_gen", "weight")
  else:
    path = ("decoder", "layers", expert, *leaf)
  logits0, vel0 = forward(params)
  logits1, vel1 = forward(_perturb(params, path))
  own, other = (_moved(logits0, logits1, und_valid), _moved(vel0, vel1, gen_valid))
  if expert == "gen":
    own, other = other, own
  assert own > 1e-4, f"{path} did not move its own buffer"
  assert other == 0.0, f"{path} moved the other expert's buffer by {other}"


def test_kv_projections_feed_the_joint_attention(setup):
  params, forward, und_valid, gen_valid = setup
  logits0, vel0 = forward(params)
  _, vel1 = forward(_perturb(params, ("decoder", "layers", "und", "self_attn", "v_proj", "kernel")))
  assert _moved(vel0, vel1, gen_valid) > 1e-5  # image tokens read their und-side context (markers, text)
