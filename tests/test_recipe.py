"""The users' recipe at tiny size, through the tools: import a BAGEL-layout checkpoint (made by our
exporter), fine-tune stage 2 on a storyboards JSONL + image folder with a FLUX-architecture VAE and
an HF tokenizer, direct a storyboard, export, and serve the export in PyTorch with parity."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from test_data_builders import _good, _write_png  # noqa: E402
from test_export_torch import _jax_outputs  # noqa: E402
from unimage_jax import layout, synthetic  # noqa: E402
from unimage_jax.config_loading import load_config  # noqa: E402
from unimage_jax.director import Director  # noqa: E402
from unimage_jax.interchange import export, orbax_io  # noqa: E402
from unimage_jax.interchange.hf_tokenizer import train_hf_tokenizer  # noqa: E402
from unimage_jax.model import functional  # noqa: E402
from unimage_jax.tokenizer import user_symbols  # noqa: E402
from unimage_jax.torch_serving import load_exported  # noqa: E402
from unimage_jax.vae import flux_vae, store  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = flux_vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4)

RECIPE_CONFIG = '''
from unimage_jax.config_base import apply_stage
from unimage_jax.config_loading import load_config


def get_config():
  c = load_config("tests/micro_config.py")  # micro sizes of configs/tiny.py
  c.model.update(autoencoder="flux_vae", latent_channels=16, vae_downsample=8, max_latent_grid=4,
                 vocab_size=512, vae_path="{root}/vae")
  c = apply_stage(c, "stage2")
  c.data.update(dataset="storyboards", data_dir="{root}/data", tokenizer_path="{root}/tokenizer",
                latent_cache_dir="{root}/latents", image_size=32, und_len=256, gen_len=24)
  c.train.update(steps=2, workdir="{root}/run", init_from="{root}/imported", checkpoint_every=2)
  c.inference.update(num_steps=2, cache_capacity=512, max_script_tokens=48, max_attempts=1)
  return c
'''


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run (conftest's 8 would need batch 8)
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
  return proc.stdout


def test_users_recipe_at_tiny_size(tmp_path):
  root = str(tmp_path)
  cfg_path = tmp_path / "recipe.py"
  cfg_path.write_text(RECIPE_CONFIG.format(root=root))
  config = load_config(str(cfg_path))

  # what the user has: a BAGEL-layout release (no unimage/vae JSONs, no qk_norm), storyboards, a
  # FLUX-architecture VAE and the checkpoint's tokenizer.json
  params, tables = functional.init_params(config.model, 0)
  release = tmp_path / "release"
  export.export_params(params, tables, config.model, str(release))
  for name in ("unimage_config.json", "vae_config.json"):
    os.remove(release / name)
  llm = json.loads((release / "llm_config.json").read_text())
  del llm["qk_norm"]  # BAGEL's loaders set q/k norms themselves; a release file need not say it
  (release / "llm_config.json").write_text(json.dumps(llm))
  (tmp_path / "user" / "images").mkdir(parents=True)
  _write_png(tmp_path / "user" / "images" / "a.png")
  _write_png(tmp_path / "user" / "images" / "b.png", (200, 10, 10), (30, 50))
  stories = [_good(i) for i in range(6)]
  (tmp_path / "user" / "scripts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stories))
  store.save_vae(flux_vae.FluxVAE(VAE, rngs=nnx.Rngs(0)), f"{root}/vae")
  lines = [line for s in stories for line in [s["prompt"], *s["characters"], *s["environments"]]
           + [sh[k] for sh in s["shots"] for k in ("frame", "video")]]
  train_hf_tokenizer(lines * 10, f"{root}/tokenizer/tokenizer.json", 512, special_tokens=user_symbols())

  # 1. import; 2. build the storyboards; 3. stage-2 fine-tune (the latent cache is built on first use)
  _run("tools/import_checkpoint.py", "--format=bagel", f"--source={release}", f"--config={cfg_path}",
       f"--output={root}/imported")
  _run("tools/build_data.py", "--dataset=storyboards", f"--jsonl={root}/user/scripts.jsonl",
       f"--image_dir={root}/user/images", f"--data_dir={root}/data", "--image_size=32")
  _run("tools/train.py", f"--config={cfg_path}")
  assert orbax_io.finished_steps(f"{root}/run/checkpoints") == [2]
  assert os.path.exists(f"{root}/run/tokenizer.json")

  # 4. direct a storyboard (VAE decoder, HF tokenizer); the script may need repairs at 2 steps
  director = Director.from_checkpoint(f"{root}/run")
  from data_pipelines.builders import decode_record, load_source
  script = decode_record(load_source(f"{root}/data", "storyboards", "train")[0])["script"]
  images = director.draw_keyframes(script, seed=0)
  assert len(images) == 2 and all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)

  # 5. export and serve in PyTorch: same logits/velocities as the JAX model of the fine-tuned step
  _run("tools/export_torch.py", f"--checkpoint={root}/run", f"--output={root}/export", "--dtype=float32")
  assert os.path.exists(f"{root}/export/ema.safetensors")
  p2, t2, cfg2 = orbax_io.restore_params(f"{root}/run")
  batch = synthetic.random_batch(cfg2, seed=1)
  zeros = np.zeros(batch["gen_latent_pos"].shape, np.float32)
  logits, velocity = _jax_outputs(cfg2.model, p2, t2, batch, batch["gen_latents"], zeros)
  model = load_exported(f"{root}/export")
  with torch.no_grad():
    t_logits, t_velocity = model({k: torch.from_numpy(np.array(v)) for k, v in batch.items()})
  valid = batch["und_segment_kinds"] != layout.KIND_PAD
  np.testing.assert_allclose(t_logits.numpy()[valid], logits[valid], atol=1e-4, rtol=1e-4)
  gen = batch["gen_segment_kinds"] != layout.KIND_PAD
  np.testing.assert_allclose(t_velocity.numpy()[gen], velocity[gen], atol=1e-4, rtol=1e-4)
  # the fine-tuned weights moved away from the imported ones
  assert not np.array_equal(np.asarray(p2["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))

