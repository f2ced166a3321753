"""Compiles the real sharded train step for a TPU topology on this (CPU) host and reports memory.

  pip install -e '.[tpu]'
  python tools/aot_compile.py --config=configs/bagel_7b.py --topology=v5p-128
  python tools/aot_compile.py --config=configs/mot_1b.py --topology=v5e-256 --config.mesh.fsdp=-1
  python tools/aot_compile.py --config=configs/bagel_7b.py --topology=v5e-256 --num_slices=2 \
      --config.mesh.dcn_data=2      # two slices over DCN; prints the collective bytes that cross them
Exits 1 with the knobs to turn when the step does not fit a chip's HBM.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bagel_7b.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128", "Slice name (v5p-128, v5e-256, v6e-256, v4-64, v5p-8, "
                                "...) or generation:shape (v5p:4x4x4).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN (multi-slice); "
                                   "config.mesh.dcn_data * dcn_fsdp must equal it.")
_SERIALIZE = flags.DEFINE_string("serialize", None, "Write the compiled executable here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from unimage_jax import aot
  config = _CONFIG.value
  try:
    plan = aot.compile_train_step(config, _TOPOLOGY.value, _NUM_SLICES.value)  # a ConfigError exits 2 (unimage_jax.cli)
  except aot.DoesNotFitError as e:
    print(f"error: does not fit: {e}", file=sys.stderr)
    sys.exit(1)
  print(aot.report(plan, config))
  if _SERIALIZE.value:
    from jax.experimental import serialize_executable
    payload, _, _ = serialize_executable.serialize(plan.compiled)
    with open(_SERIALIZE.value, "wb") as f:
      f.write(payload)
    print(f"serialized executable ({len(payload) / 1e6:.1f} MB) to {_SERIALIZE.value}")
  if not plan.fits:
    print(f"error: does not fit: {aot.advice(plan, config)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
