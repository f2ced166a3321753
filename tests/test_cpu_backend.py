"""The tools' XLA:CPU setting: YNNPACK dots on by default, off on request, numerically the same."""

import os
import subprocess
import sys

import numpy as np

from unimage_jax import cpu_backend


def test_configure_adds_the_flag_once_and_respects_the_user():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert cpu_backend.configure(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", cpu_backend.YNN_DOTS]
  assert cpu_backend.configure(env) and env["XLA_FLAGS"].count("ynn_fusion_type") == 1
  off = {"UNIMAGE_CPU_DOTS": "xla"}
  assert not cpu_backend.configure(off) and "XLA_FLAGS" not in off
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}
  assert not cpu_backend.configure(mine)  # the user's own choice stays as written
  assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"


_PROBE = """
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
a, b = rng.normal(size=(4, 96, 256)).astype(np.float32), rng.normal(size=(256, 192)).astype(np.float32)
f = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(jnp.einsum("bld,de->ble", a, b)) ** 2), argnums=(0, 1)))
np.save(OUT, np.concatenate([g.ravel() for g in f(a, b)]))
"""


def test_ynn_dots_match_xla_dots(tmp_path):
  """The same jitted gradient with and without the flag (each in a fresh process)."""
  outs = []
  for name, flags in (("xla", ""), ("ynn", cpu_backend.YNN_DOTS)):
    out = str(tmp_path / f"{name}.npy")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", f"OUT = {out!r}\n" + _PROBE], env=env, check=True, timeout=300)
    outs.append(np.load(out))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
