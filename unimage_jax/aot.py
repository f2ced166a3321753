"""Ahead-of-time planning of a TPU run from a CPU host: compile the real sharded train step for a
TPU topology (libtpu's topology descriptions, no TPU attached) and report per-chip memory.

Why: a 7B MoT run on a pod should be known to fit, and how fast it should be, before the pod is
reserved. The compiled step is exactly the trainer's (same state shardings, donation, remat,
attention implementation); only the devices are descriptions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
from unimage_jax import hlo_analysis, sharding
from unimage_jax.attention.dispatch import resolve_impl
from unimage_jax.config_validation import ConfigError, validate_config
from unimage_jax.training import metrics as metrics_lib, train_setup

# Per-chip HBM (bytes) and the topology shape of the usual slice names ("v5p-128": TensorCores).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
SLICES = {
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
}


class DoesNotFitError(RuntimeError):
  """The step needs more memory per chip than the chip has (raised when XLA refuses to compile)."""

  def __init__(self, message: str, plan: "Plan"):
    super().__init__(message)
    self.plan = plan


def topology_spec(name: str) -> tuple[str, str]:
  """'v5p-128' or 'v5p:4x4x4' -> (libtpu topology name, chip generation)."""
  spec = SLICES.get(name, name)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(x\d+)+)", spec)
  if not m:
    raise ConfigError(f"--topology={name!r}: use a slice name ({', '.join(sorted(SLICES))}) or "
                      "generation:shape such as v5p:4x4x4")
  return spec, m.group(1)


def topology_devices(name: str, num_slices: int = 1):
  """The devices of ``num_slices`` copies of the slice ``name`` (each device has ``slice_index``
  when ``num_slices > 1``), described by libtpu; nothing is attached."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise ConfigError("ahead-of-time TPU compilation needs libtpu: pip install -e '.[tpu]'") from e
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  spec, _ = topology_spec(name)
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    return topologies.get_topology_desc(topology_name=spec, platform="tpu", **kwargs).devices
  except jax.errors.JaxRuntimeError as e:  # e.g. a slice smaller than one host (v5e:1x1)
    raise ConfigError(f"--topology={name!r}: libtpu cannot describe it: {str(e).splitlines()[0]}") from None


@dataclasses.dataclass
class Plan:
  topology: str
  devices: int
  mesh: dict[str, int]
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  hbm_bytes: int
  xla_flops_per_device: float | None
  compile_seconds: float
  compiled: Any = dataclasses.field(repr=False, default=None)
  attention_impl: str = "xla"
  num_slices: int = 1
  traffic: hlo_analysis.Traffic | None = None  # collective payload, DCN vs ICI (from the compiled HLO)

  @property
  def total_bytes(self) -> int:
    """Peak per-device footprint: arguments + outputs + temporaries, minus donated (aliased) outputs."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes


def compile_train_step(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1) -> Plan:
  """Lowers and compiles the sharded train step for ``num_slices`` x ``topology``; returns the plan.

  With several slices, ``config.mesh.dcn_data * dcn_fsdp`` must equal ``num_slices`` (the DCN
  axes of the hybrid mesh; when both are 1, ``dcn_data = num_slices``: data parallel across
  slices); the plan also counts the collective bytes that cross slices.
  """
  validate_config(config)
  config = config.copy_and_resolve_references()
  # "auto" means the kernel of the *target* backend, not of this CPU host
  config.model.attention_impl = resolve_impl(config.model.attention_impl, backend="tpu")
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be >= 1")
  dcn = sharding.dcn_shape(config.mesh)
  if num_slices > 1 and math.prod(dcn) == 1:  # the usual multi-slice layout: data parallel across slices
    config.mesh.dcn_data = num_slices
    dcn = sharding.dcn_shape(config.mesh)
  if math.prod(dcn) != num_slices:
    raise ConfigError(f"--num_slices={num_slices} but config.mesh.dcn_data={dcn[0]} x dcn_fsdp={dcn[1]} = "
                      f"{math.prod(dcn)}: set the DCN axes to spread the mesh over the slices "
                      f"(e.g. --config.mesh.dcn_data={num_slices} or --config.mesh.dcn_fsdp={num_slices})")
  devices = topology_devices(topology, num_slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = train_setup.setup_train(config, mesh)  # the trainer's own program: shardings, donation
  t0 = time.time()
  _, generation = topology_spec(topology)
  try:
    compiled = setup.compile(setup.state_spec())
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
    plan = Plan(topology=topology, devices=len(devices), mesh=dict(mesh.shape), num_slices=num_slices, argument_bytes=0,
                output_bytes=0, temp_bytes=int(float(needed.group(1)) * (1 << 30)) if needed else 0,
                alias_bytes=0, hbm_bytes=HBM_BYTES[generation], xla_flops_per_device=None,
                compile_seconds=time.time() - t0)
    raise DoesNotFitError(f"the compiler ran out of HBM on {topology}: {str(e).splitlines()[0]}\n"
                          f"{advice(plan, config)}", plan) from None
  elapsed = time.time() - t0
  mem = compiled.memory_analysis()
  flat = list(mesh.devices.flat)  # SPMD partition id i runs on the device assignment's i-th device
  collectives = hlo_analysis.parse_collectives(compiled.as_text(), len(flat))
  traffic = hlo_analysis.traffic(collectives, [getattr(d, "slice_index", 0) for d in flat])
  return Plan(
      topology=topology, devices=len(devices), mesh=dict(mesh.shape), attention_impl=config.model.attention_impl,
      num_slices=num_slices, traffic=traffic,
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      hbm_bytes=HBM_BYTES[generation], xla_flops_per_device=metrics_lib.compiled_flops(compiled),
      compile_seconds=elapsed, compiled=compiled)


def advice(plan: Plan, config: ml_collections.ConfigDict) -> str:
  """What to turn when a plan does not fit, largest lever first."""
  gib = lambda b: b / (1 << 30)
  knobs = []
  if plan.mesh.get("fsdp", 1) < plan.devices:
    knobs.append(f"shard parameters and optimizer state wider: config.mesh.fsdp (now {plan.mesh.get('fsdp', 1)})")
  if config.model.remat_policy != "full":
    knobs.append(f"recompute more: config.model.remat_policy=full (now {config.model.remat_policy!r})")
  knobs.append(f"fewer rows per step: config.data.batch_size (now {config.data.batch_size}; "
               "config.train.grad_accum_steps keeps the global batch)")
  knobs.append(f"shorter rows: config.data.und_len + gen_len (now {config.data.und_len} + {config.data.gen_len})")
  if config.model.param_dtype == "float32":
    knobs.append("config.model.param_dtype=bfloat16")
  return (f"needs {gib(plan.total_bytes):.1f} GiB per chip, the chip has {gib(plan.hbm_bytes):.0f} GiB; turn: "
          + "; ".join(knobs))


def report(plan: Plan, config: ml_collections.ConfigDict) -> str:
  gib = lambda b: f"{b / (1 << 30):.2f} GiB"
  peak = metrics_lib.PEAK_FLOPS.get({"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}[
      topology_spec(plan.topology)[1]])
  slices = f"{plan.num_slices} x " if plan.num_slices > 1 else ""
  lines = [
      f"topology {slices}{plan.topology}: {plan.devices} devices, mesh {plan.mesh}, attention {plan.attention_impl}, "
      f"remat {config.model.remat_policy}, compiled in {plan.compile_seconds:.1f}s",
      f"per device: arguments {gib(plan.argument_bytes)}, outputs {gib(plan.output_bytes)}, "
      f"temporaries {gib(plan.temp_bytes)}, donated {gib(plan.alias_bytes)}",
      f"per device total {gib(plan.total_bytes)} of {gib(plan.hbm_bytes)} HBM: {'fits' if plan.fits else 'DOES NOT FIT'}",
  ]
  if plan.traffic is not None:
    lines.append(str(plan.traffic))
  tokens = metrics_lib.tokens_per_step(config)
  model_flops = metrics_lib.analytic_flops_per_step(config) / plan.devices
  lines.append(f"model FLOPs per device per step {model_flops:.3e} ({tokens:,} tokens per step); XLA cost "
               f"analysis {plan.xla_flops_per_device or 0:.3e} (counts a scanned layer once, kernels as 0)")
  for mfu in (0.4, 0.5):
    step_s = model_flops / (peak * mfu)
    lines.append(f"  at {mfu:.0%} MFU: {step_s:.2f} s/step, {tokens / step_s:,.0f} tokens/s")
  return "\n".join(lines)
