"""Orbax checkpoint (trainer format) -> BAGEL-layout safetensors shards + config JSONs for PyTorch.

  python tools/export_torch.py --checkpoint=runs/tiny --output=exports/tiny --dtype=bfloat16

Reads the ``params``/``tables`` items of ``--step`` (default: the newest step that reads; an
unreadable one is reported and the previous is used) one array at a time, so host memory stays
near the largest array. By default the weights go to one ``ema.safetensors`` (BAGEL's loaders read
that file; ``--max_shard_gb`` writes shards + index instead). ``--checkpoint`` is a training
workdir or its checkpoints folder; the
output is written to a temporary folder and renamed into place only when complete (a failed
export leaves the previous one). Serve the result with ``unimage_jax.torch_serving.load_exported(output)``.
"""

import time

from absl import flags

from unimage_jax import cli
from unimage_jax.interchange import export

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or its checkpoints/ folder.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the safetensors shards and JSON configs.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(export.DTYPES), "Dtype of the exported floating tensors.")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "Export the EMA weights (what BAGEL's ema.safetensors holds).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 0.0, "0: one ema.safetensors (what BAGEL's loaders read); "
                                "> 0: model-*-of-*.safetensors shards of at most this many GiB plus an index.")


def main(argv):
  del argv
  start = time.time()
  step, shards = export.export_checkpoint_step(_CHECKPOINT.value, _OUTPUT.value, step=_STEP.value, dtype=_DTYPE.value,
                                               max_shard_bytes=int(_SHARD_GB.value * (1 << 30)) or None,
                                               use_ema=_USE_EMA.value)
  print(f"wrote {', '.join(shards) if len(shards) == 1 else f'{len(shards)} shards'} of step {step} to "
        f"{_OUTPUT.value} in {time.time() - start:.1f}s")


if __name__ == "__main__":
  cli.run(main)
