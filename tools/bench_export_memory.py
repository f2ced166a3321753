"""Peak host memory of exporting a ~1B-parameter checkpoint: streaming exporter vs a naive one.

  JAX_PLATFORMS=cpu python tools/bench_export_memory.py --workdir=/tmp/bench_export

Stages run in separate subprocesses so each peak RSS (``ru_maxrss``) belongs to one job:
``create`` writes a random Orbax checkpoint (configs/mot_1b.py, ViT off, ``--num_layers`` layers:
4 gives ~1.0B parameters, 4.0 GB fp32); ``stream`` runs ``export.export_checkpoint`` (per-array
restore, tensor-by-tensor shards); ``naive`` restores the whole tree, builds the whole state dict
and writes it with ``safetensors.numpy.save_file``. Peaks are reported in GB and as multiples of
the largest tensor, both in total and above the process's baseline after imports.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_export", "Scratch directory (several GB).")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "MoT layers of the mot_1b-shaped model.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Export dtype.")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "create", "stream", "naive"], "Internal: one stage.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoint and exports afterwards.")

GB = 1e9


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB


def _config():
  from unimage_jax.config_loading import load_config

  c = load_config("configs/mot_1b.py")
  c.model.vit.enabled = False
  c.model.num_layers = _LAYERS.value
  c.data.vit_len = 0
  return c


def _create(ckpt: str) -> dict:
  import jax
  import numpy as np

  from unimage_jax.interchange import orbax_io
  from unimage_jax.model import functional
  from unimage_jax.model.positional import sincos_2d_table

  c = _config()
  abstract_params, abstract_tables = functional.abstract_params(c.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02), abstract_params)
  tables = {"latent_pos_embed": sincos_2d_table(c.model.hidden_size, c.model.max_latent_grid)}
  assert jax.tree.structure(tables) == jax.tree.structure(abstract_tables)
  orbax_io.save_params(ckpt, 0, params, tables, c)
  sizes = [x.nbytes for x in jax.tree.leaves(params)]
  from unimage_jax.interchange import keymap
  plan = keymap.export_plan(abstract_params, abstract_tables, c.model)
  largest = max(np.prod(e.shape) * np.dtype(e.dtype).itemsize for e in plan)
  return {"params": int(sum(x.size for x in jax.tree.leaves(params))), "checkpoint_bytes": int(sum(sizes)),
          "largest_tensor_bytes": int(largest), "largest_leaf_bytes": int(max(sizes))}


def _stream(ckpt: str, out: str) -> dict:
  import tensorstore  # noqa: F401 - imported before the baseline is taken
  from unimage_jax.interchange import export, orbax_io  # noqa: F401
  from unimage_jax.model import functional  # noqa: F401

  base = _rss_gb()
  start = time.time()
  export.export_checkpoint(ckpt, out, dtype=_DTYPE.value)
  return {"seconds": time.time() - start, "baseline_gb": base, "peak_gb": _rss_gb()}


def _naive(ckpt: str, out: str) -> dict:
  import numpy as np
  import orbax.checkpoint as ocp
  from safetensors.numpy import save_file

  from unimage_jax.interchange import export, keymap, orbax_io
  from unimage_jax.model import functional  # noqa: F401 - imported before the baseline is taken

  base = _rss_gb()
  start = time.time()
  c = orbax_io.load_config_json(ckpt)
  with ocp.CheckpointManager(os.path.abspath(ckpt)) as mgr:
    restored = mgr.restore(0, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), tables=ocp.args.StandardRestore()))
  dtype = export.DTYPES[_DTYPE.value]
  state = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in
           keymap.export_tensors(restored["params"], restored["tables"], c.model)}
  os.makedirs(out, exist_ok=True)
  save_file(state, os.path.join(out, "model.safetensors"))
  return {"seconds": time.time() - start, "baseline_gb": base, "peak_gb": _rss_gb()}


def _run_stage(stage: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--stage={stage}", f"--workdir={_WORKDIR.value}",
         f"--num_layers={_LAYERS.value}", f"--dtype={_DTYPE.value}"]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  res = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if res.returncode:
    raise RuntimeError(f"stage {stage} failed:\n{res.stderr[-4000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  ckpt = os.path.join(_WORKDIR.value, "ckpt")
  outs = {s: os.path.join(_WORKDIR.value, s) for s in ("stream", "naive")}
  if _STAGE.value != "all":
    fn = {"create": lambda: _create(ckpt), "stream": lambda: _stream(ckpt, outs["stream"]),
          "naive": lambda: _naive(ckpt, outs["naive"])}[_STAGE.value]
    print(json.dumps(fn()))
    return
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  info = _run_stage("create")
  largest = info["largest_tensor_bytes"] / GB
  print(f"checkpoint: {info['params'] / 1e9:.3f}B params, {info['checkpoint_bytes'] / GB:.2f} GB fp32; "
        f"largest tensor {largest:.3f} GB (fp32), largest checkpoint array {info['largest_leaf_bytes'] / GB:.3f} GB")
  for stage in ("stream", "naive"):
    r = _run_stage(stage)
    print(f"{stage:6s} export ({_DTYPE.value}): {r['seconds']:.1f}s, peak RSS {r['peak_gb']:.2f} GB "
          f"= {r['peak_gb'] / largest:.2f}x largest tensor; above baseline ({r['baseline_gb']:.2f} GB): "
          f"{r['peak_gb'] - r['baseline_gb']:.2f} GB = {(r['peak_gb'] - r['baseline_gb']) / largest:.2f}x")
  if not _KEEP.value:
    shutil.rmtree(_WORKDIR.value, ignore_errors=True)


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
