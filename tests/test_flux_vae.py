"""The Flax FLUX-style VAE against diffusers' AutoencoderKL (FLUX settings, tiny random weights)."""


import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from unimage_jax.interchange.keymap import KeyMismatchError  # noqa: E402
from unimage_jax.vae import flux_vae  # noqa: E402

LEVELS = (32, 64, 64)  # 4x downsampling; FLUX uses (128, 256, 512, 512) for 8x


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(LEVELS),
      up_block_types=("UpDecoderBlock2D",) * len(LEVELS), block_out_channels=LEVELS, layers_per_block=1,
      latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
      scaling_factor=0.3611, shift_factor=0.1159).eval().float()
  with torch.no_grad():  # non-trivial norms and biases
    for _, p in vae.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("vae") / "vae")
  vae.save_pretrained(path, safe_serialization=True)
  return vae, path


def test_encode_decode_match_diffusers(diffusers_vae):
  vae, path = diffusers_vae
  ours = flux_vae.import_vae(path)
  assert ours.config.latent_channels == 16 and ours.config.block_out_channels == LEVELS
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)  # NCHW
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
  got_mean, got_logvar = ours.encode_moments(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got_mean).transpose(0, 3, 1, 2), mean, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(got_logvar).transpose(0, 3, 1, 2), logvar, atol=1e-4, rtol=1e-4)
  # normalised latents as BAGEL uses them: 0.3611 * (z - 0.1159)
  z = np.asarray(ours.encode(jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(z.transpose(0, 3, 1, 2), 0.3611 * (mean - 0.1159), atol=1e-4, rtol=1e-4)

  lat = np.random.default_rng(1).standard_normal((2, 16, 4, 4)).astype(np.float32)
  with torch.no_grad():
    image = vae.decode(torch.from_numpy(lat)).sample.numpy()
  got = np.asarray(ours.decode_raw(jnp.asarray(lat.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
  assert got.shape == image.shape == (2, 3, 16, 16)
  np.testing.assert_allclose(got, image, atol=1e-4, rtol=1e-4)
  assert np.abs(image).max() > 0.1
  # decode inverts encode's normalisation
  np.testing.assert_allclose(np.asarray(ours.decode(jnp.asarray(z))),
                             np.asarray(ours.decode_raw(jnp.asarray(mean.transpose(0, 2, 3, 1)))), atol=1e-4)


def test_original_flux_key_names_import_and_mismatches_are_listed(diffusers_vae, tmp_path):
  from safetensors.numpy import save_file

  vae, path = diffusers_vae
  state = {k: v.numpy() for k, v in vae.state_dict().items()}
  # write the same weights under the original FLUX ae.safetensors names (attention as 1x1 convs)
  n = len(LEVELS)
  inverse = {}
  for k in state:
    bfl = k.replace("conv_norm_out", "norm_out").replace("mid_block.resnets.0", "mid.block_1")
    bfl = bfl.replace("mid_block.resnets.1", "mid.block_2").replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
    bfl = bfl.replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")
    for q in "qkv":
      bfl = bfl.replace(f"mid_block.attentions.0.to_{q}", f"mid.attn_1.{q}")
    bfl = bfl.replace("conv_shortcut", "nin_shortcut").replace("downsamplers.0", "downsample")
    parts = bfl.split(".")
    if parts[1] == "down_blocks":
      parts[1] = "down"
    if parts[1] == "up_blocks":
      parts[1:3] = ["up", str(n - 1 - int(parts[2]))]
    bfl = ".".join(parts).replace(".resnets.", ".block.").replace("upsamplers.0", "upsample")
    v = state[k]
    inverse[bfl] = v[:, :, None, None] if "attn_1" in bfl and v.ndim == 2 else v
  assert "decoder.up.0.block.0.conv1.weight" in inverse and "encoder.mid.attn_1.q.weight" in inverse
  ae = str(tmp_path / "ae.safetensors")
  save_file(inverse, ae)
  cfg = flux_vae.VAEConfig(block_out_channels=LEVELS, layers_per_block=1)
  a, b = flux_vae.import_vae(ae, cfg), flux_vae.import_vae(path)
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(a.encode(x)), np.asarray(b.encode(x)))

  del inverse["encoder.conv_in.bias"]
  inverse["encoder.extra"] = np.zeros(1, np.float32)
  save_file(inverse, ae)
  with pytest.raises(KeyMismatchError) as err:
    flux_vae.import_vae(ae, cfg)
  assert "missing: encoder.conv_in.bias" in str(err.value) and "unexpected: encoder.extra" in str(err.value)
  with pytest.raises(KeyMismatchError, match="wrong shape"):
    flux_vae.import_vae(path, flux_vae.VAEConfig(block_out_channels=(32, 64, 96), layers_per_block=1))


def test_the_cli_import_is_what_config_vae_path_reads(diffusers_vae, tmp_path):
  """tools/import_checkpoint.py --format=vae writes the folder ``config.model.vae_path`` names;
  it, and the diffusers folder itself, load through ``store.load_vae`` to the same encoder."""
  from tool_runs import run_tool
  from unimage_jax.vae import store
  _, path = diffusers_vae
  out = tmp_path / "vae_import"
  proc = run_tool("import_checkpoint.py", "--format=vae", f"--source={path}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32))
  imported, direct = store.load_vae(str(out)), store.load_vae(path)
  assert imported.config == direct.config
  np.testing.assert_array_equal(np.asarray(imported.encode(x)), np.asarray(direct.encode(x)))
