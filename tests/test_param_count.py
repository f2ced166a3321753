"""Abstract parameter counts: the BAGEL-7B-MoT layout, computed without allocating."""

import pathlib
import subprocess
import sys

from unimage_jax import param_count
from unimage_jax.config_loading import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_bagel_7b_breakdown_matches_the_bagel_layout():
  rows = param_count.breakdown(load_config("configs/bagel_7b.py").model)
  e, v, f, layers = 3584, 152064, 18944, 28
  per_expert_layer = (e * e + e) + 2 * (e * 512 + 512) + e * e + 3 * e * f + 2 * e + 2 * 128
  assert rows["embed_tokens"] == rows["lm_head"] == v * e
  assert rows["decoder.und (all layers)"] == rows["decoder.gen (all layers)"] == layers * per_expert_layer
  vit_layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
  assert rows["vit_model"] == 26 * vit_layer + (14 * 14 * 3 * 1152 + 1152) + 4900 * 1152 + 2 * 1152
  assert rows["connector"] == 1152 * e + e + e * e + e
  assert 14.5e9 < rows["total trainable"] < 14.7e9  # "about 14.6B with ViT"
  assert rows["total with fixed tables"] == rows["total trainable"] + (64 * 64 + 70 * 70) * e


def test_param_count_tool_prints_the_table():
  out = subprocess.run([sys.executable, "tools/param_count.py", "--config=configs/bagel_7b.py"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                                                         "PYTHONPATH": str(REPO)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| total trainable" in out.stdout and "14,575,018,464" in out.stdout
