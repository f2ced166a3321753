"""--config.train.profile_steps=a,b writes a jax.profiler trace of those steps into the workdir."""

import glob
import os

import jax
import pytest

from unimage_jax.config_validation import ConfigError, validate_config
from unimage_jax.training import loop, profiling


def test_profile_steps_write_a_trace(tiny_config, tmp_path):
  c = tiny_config
  c.train.update(workdir=str(tmp_path), steps=3, profile_steps="2,3")
  loop.train(c, devices=jax.devices()[:1])
  traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_bad_profile_steps_are_named():
  assert profiling.parse_steps("") is None and profiling.parse_steps("5, 7") == (5, 7)
  for bad in ("5", "7,5", "0,2", "a,b"):
    with pytest.raises(ValueError, match="config.train.profile_steps="):
      profiling.parse_steps(bad)


def test_pod_fields_are_validated(tiny_config):
  tiny_config.mesh.dcn_fsdp = 0
  tiny_config.train.update(profile_steps="3", data_resume="sometimes")
  with pytest.raises(ConfigError) as e:
    validate_config(tiny_config)
  for field in ("config.mesh.dcn_fsdp=0", "config.train.profile_steps='3'", "config.train.data_resume='sometimes'"):
    assert field in str(e.value)
