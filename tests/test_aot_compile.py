"""Ahead-of-time compile of the real sharded train step for a TPU topology (needs the tpu extra)."""

import re

import pytest
from tool_runs import run_tool

from unimage_jax import aot
from unimage_jax.config_validation import ConfigError

try:
  import libtpu  # noqa: F401
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False


def test_topology_names():
  assert aot.topology_spec("v5p-128") == ("v5p:4x4x4", "v5p")
  assert aot.topology_spec("v5e:2x2") == ("v5e:2x2", "v5e")
  with pytest.raises(ConfigError, match="--topology='v9-1'"):
    aot.topology_spec("v9-1")


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_a_topology_libtpu_cannot_describe_is_a_config_error():
  with pytest.raises(ConfigError, match=r"--topology='v5e:1x1': libtpu cannot describe it: .*not divisible"):
    aot.topology_devices("v5e:1x1")  # smaller than one v5e host (2x2)


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tiny_train_step_compiles_for_v5e_2x2(tiny_config):
  tiny_config.data.batch_size = 4
  tiny_config.mesh.update(data=2, fsdp=2, tensor=1)
  tiny_config.model.attention_impl = "auto"  # the TPU kernel, per shard
  tiny_config.model.scan_layers = True  # the TPU layout (the tiny CPU config unrolls its layers)
  plan = aot.compile_train_step(tiny_config, "v5e:2x2")
  assert plan.devices == 4 and plan.mesh == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 1}
  assert plan.attention_impl == "pallas_tpu"
  assert plan.compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3  # fwd, dq, dkv in the scanned layer
  assert plan.fits and 0 < plan.total_bytes < plan.hbm_bytes == 16 << 30
  assert plan.argument_bytes > 0 and plan.temp_bytes > 0
  assert plan.alias_bytes > 0  # the old state is donated to the new one
  text = aot.report(plan, tiny_config)
  assert "fits" in text and "v5e:2x2" in text
  # the same plan on a chip half its size: refused, naming the knobs
  plan.hbm_bytes = plan.total_bytes // 2  # pretend a smaller chip
  assert not plan.fits
  advice = aot.advice(plan, tiny_config)
  assert "config.mesh.fsdp" in advice and "config.model.remat_policy=full" in advice and "batch_size" in advice


def test_mesh_mismatch_refused_before_compiling(tiny_config):
  if not HAVE_LIBTPU:
    pytest.skip("libtpu is not installed")
  tiny_config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match="has 3 devices but 4 are available"):
    aot.compile_train_step(tiny_config, "v5e:2x2")


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_cli_plans_two_slices_and_reports_the_dcn_bytes():
  """``tools/aot_compile.py --num_slices=2`` as a user runs it: the smallest v5e slice twice, the
  micro config with one layer; both DCN sizes at 1, so the tool sets dcn_data=2 itself."""
  proc = run_tool("aot_compile.py", "--config=tests/micro_config.py", "--topology=v5e:2x2", "--num_slices=2",
                  "--config.data.batch_size=8", "--config.model.num_layers=1")
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
  out = proc.stdout
  assert "topology 2 x v5e:2x2: 8 devices, mesh {'data': 8, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in out, out
  assert ": fits" in out, out
  dcn = re.search(r"across slices \(DCN\) ([\d.]+) (B|KiB|MiB|GiB) in (\d+) ops \(dcn-all_reduce ", out)
  assert dcn and float(dcn.group(1)) > 0 and int(dcn.group(3)) > 0, out  # the gradient all-reduce crosses slices
  assert re.search(r"inside slices \(ICI\) [\d.]+ (B|KiB|MiB|GiB)", out), out
