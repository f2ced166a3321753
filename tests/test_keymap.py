"""The BAGEL key map: export -> import restores every parameter bit for bit; mismatches are listed."""

import jax
import numpy as np
import pytest

from unimage_jax.interchange import keymap
from unimage_jax.model import functional


def test_export_import_round_trip_is_bit_identical(tiny_config):
  cfg = tiny_config.model
  params, tables = functional.init_params(cfg, 0)
  exported = dict(keymap.export_tensors(params, tables, cfg))
  assert exported["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"].shape == (64, 64)
  assert exported["language_model.model.layers.0.self_attn.o_proj.weight"].shape == (64, 64)
  assert exported["language_model.model.layers.0.self_attn.k_proj.bias"].shape == (32,)
  assert exported["vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (64, 32)
  assert exported["time_embedder.mlp.0.weight"].shape == (64, 256)
  p2, t2 = keymap.import_tensors(exported.__getitem__, set(exported), *functional.abstract_params(cfg), cfg)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, (params, tables)), (p2, t2))


def test_mismatches_are_listed_not_raised_one_by_one(tiny_config):
  cfg = tiny_config.model
  params, tables = functional.init_params(cfg, 0)
  exported = dict(keymap.export_tensors(params, tables, cfg))
  del exported["language_model.lm_head.weight"]
  exported["extra.weight"] = np.zeros(3)
  exported["vae2llm.weight"] = np.zeros((5, 5))
  with pytest.raises(keymap.KeyMismatchError) as e:
    keymap.import_tensors(exported.__getitem__, set(exported), *functional.abstract_params(cfg), cfg)
  msg = str(e.value)
  assert "1 missing: language_model.lm_head.weight" in msg
  assert "1 unexpected: extra.weight" in msg
  assert "vae2llm.weight: checkpoint has (5, 5), model expects (64, 192)" in msg
