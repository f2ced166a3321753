"""TPU ahead-of-time memory analysis of the attention fwd+bwd step: Pallas kernel vs XLA reference.

Compiles ``jit(value_and_grad(sum(attention(q, k, v, meta))))`` under shard_map for a TPU
topology on the CPU host (needs libtpu: ``pip install -e '.[tpu]'``) and prints the compiler's
per-device memory analysis for each sequence length as a markdown table.

  python tools/attention_memory.py --topology=v5e:2x2 --lengths=8192,16384,32768
  # context parallelism: rows split over a sequence axis of 4 (mesh data, fsdp, sequence, tensor)
  python tools/attention_memory.py --topology=v5p:2x2x1 --mesh=1,1,4,1 --batch=1 --lengths=26624 --impls=pallas_tpu
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from unimage_jax.choices import CONTEXT_PARALLEL, XLA_ATTENTION_IMPLS  # noqa: E402
from unimage_jax.testing import attention_aot as aot  # noqa: E402

_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name for get_topology_desc")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768"], "sequence lengths")
_MESH = flags.DEFINE_list("mesh", ["4", "1", "1"], "mesh shape (data, fsdp, tensor), or (data, fsdp, sequence, "
                          "tensor): rows split over sequence (context parallelism, K/V all-gathered)")
_BATCH = flags.DEFINE_integer("batch", 4, "global batch (rows)")
_HQ = flags.DEFINE_integer("q_heads", 28, "query heads (bagel_7b: 28)")
_HKV = flags.DEFINE_integer("kv_heads", 4, "key/value heads (bagel_7b: 4)")
_D = flags.DEFINE_integer("head_dim", 128, "head dim")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "activation dtype")
_BQ = flags.DEFINE_integer("block_q", 256, "kernel query block")
_BK = flags.DEFINE_integer("block_k", 512, "kernel key block")
_IMPLS = flags.DEFINE_list("impls", ["pallas_tpu", "xla"], "implementations to compile")
_STRATEGIES = flags.DEFINE_list("strategies", list(CONTEXT_PARALLEL), "with a sequence axis: context-parallel "
                                "strategies to compile (ring only for the XLA impls)")


def _mib(x: int) -> str:
  return f"{x / 2**20:,.1f}"


def main(argv):
  del argv
  shape = tuple(int(x) for x in _MESH.value)
  cp = len(shape) == 4
  mesh = aot.topology_mesh(_TOPOLOGY.value, shape, axes=aot.CP_AXES if cp else ("data", "fsdp", "tensor"))
  compile_step = aot.compile_cp_attention_step if cp else aot.compile_attention_step
  print(f"topology {_TOPOLOGY.value}, mesh {dict(mesh.shape)}, global batch {_BATCH.value}, "
        f"heads {_HQ.value}/{_HKV.value}, head_dim {_D.value}, {_DTYPE.value}, "
        f"kernel blocks {_BQ.value}x{_BK.value}; per-device MiB from compiled.memory_analysis()")
  print()
  print("| L | impl | arguments | outputs | temp | args+outputs+temp | compile s |")
  print("|---|---|---|---|---|---|---|")
  for length in (int(x) for x in _LENGTHS.value):
    shape = aot.AttentionShape(_BATCH.value, length, _HQ.value, _HKV.value, _D.value,
                               _DTYPE.value)
    runs = [(impl, None) for impl in _IMPLS.value]
    if cp:
      runs = [(impl, st) for impl in _IMPLS.value for st in _STRATEGIES.value
              if st == "all_gather" or impl in XLA_ATTENTION_IMPLS]
    for impl, strategy in runs:
      kw = {"block_q": _BQ.value, "block_k": _BK.value} if impl.startswith("pallas") else {}
      if strategy:
        kw["strategy"] = strategy
      label = impl if strategy is None else f"{impl} {strategy}"
      t = time.time()
      try:
        stats = aot.memory_stats(compile_step(mesh, shape, impl, **kw))
      except Exception as e:  # report, e.g., an out-of-memory compile failure, and go on
        msg = str(e).splitlines()[0][:120]
        print(f"| {length} | {label} | compile failed: {msg} | | | | {time.time() - t:.1f} |")
        continue
      print(f"| {length} | {label} | {_mib(stats['argument_bytes'])} | "
            f"{_mib(stats['output_bytes'])} | {_mib(stats['temp_bytes'])} | "
            f"{_mib(stats['argument_bytes'] + stats['output_bytes'] + stats['temp_bytes'])} | "
            f"{time.time() - t:.1f} |", flush=True)


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
