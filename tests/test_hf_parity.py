"""Text-only parity of the und path against `transformers` (an independent implementation).

Qwen2ForCausalLM <-> our model with q/k norm off; Qwen3ForCausalLM with attention_bias=True and a
zeroed o_proj bias <-> our model with q/k norm on (BAGEL's und expert exactly).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimage_jax import layout  # noqa: E402
from unimage_jax.interchange import keymap  # noqa: E402
from unimage_jax.model import functional  # noqa: E402

SEQ = 11


def _hf_model(kind: str):
  common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1e6)
  torch.manual_seed(0)
  if kind == "qwen2":
    cfg = transformers.Qwen2Config(**common)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.Qwen3Config(head_dim=16, attention_bias=True, **common)
    model = transformers.Qwen3ForCausalLM(cfg)
  with torch.no_grad():  # make norms and biases non-trivial so they are really tested
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
    if kind == "qwen3":
      for layer in model.model.layers:
        layer.self_attn.o_proj.bias.zero_()  # BAGEL's o_proj has no bias
  return model.eval().float()


def _our_params(tiny_config, hf_model, qk_norm: bool):
  cfg = tiny_config.model
  cfg.update(qk_norm=qk_norm, rope_theta=1e6)
  params, tables = functional.init_params(cfg, seed=1)
  ours = dict(keymap.export_tensors(params, tables, cfg))
  hf_state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  mapped = keymap.llm_to_bagel_state(hf_state, cfg)
  assert "language_model.model.layers.1.mlp_moe_gen.down_proj.weight" in mapped
  ours.update(mapped)
  abstract = functional.abstract_params(cfg)
  return cfg, *keymap.import_tensors(ours.__getitem__, set(ours), *abstract, cfg)


def _text_batch(tiny_config, ids):
  sizes = layout.BufferSizes(tiny_config.data.und_len, 4, 0, 4)
  row = layout.pack_row([[layout.TextSegment(ids)]], sizes, latent_dim=192, latent_grid=4, vit_patch_dim=48)
  return {k: jnp.asarray(v[None]) for k, v in row.items()}


@pytest.mark.parametrize("kind,qk_norm", [("qwen2", False), ("qwen3", True)])
def test_text_logits_match_transformers(tiny_config, kind, qk_norm):
  hf = _hf_model(kind)
  cfg, params, tables = _our_params(tiny_config, hf, qk_norm)
  ids = np.random.default_rng(0).integers(0, 128, SEQ)
  with torch.no_grad():
    expected = hf(torch.tensor(ids[None])).logits[0].numpy()  # [SEQ, V]
  batch = _text_batch(tiny_config, ids)
  mdef = functional.model_def(cfg)

  @jax.jit
  def logits(params, tables, batch):
    model = mdef.bind(params, tables)
    hidden, _ = model(batch, batch["gen_latents"], jnp.zeros(batch["gen_latent_pos"].shape))
    return model.logits(hidden)

  got = np.asarray(logits(params, tables, batch))[0, :SEQ]
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
  assert np.abs(expected).max() > 0.1  # not a vacuous comparison
