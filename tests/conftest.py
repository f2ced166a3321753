"""Test setup: CPU only, 8 host devices for sharding tests, x64 off."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import pytest  # noqa: E402

from unimage_jax.config_loading import load_config  # noqa: E402


MICRO_CONFIG = "tests/micro_config.py"


@pytest.fixture
def tiny_config():
  """The tiny config shrunk further so each compile takes seconds on 2 cores."""
  return load_config(MICRO_CONFIG)
