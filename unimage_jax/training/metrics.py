"""Step metrics: JSONL + TensorBoard event files, throughput and MFU.

MFU = analytic model FLOPs per device per second (:func:`analytic_flops_per_step`) divided by
the device's peak dense bf16 FLOP/s from the table below.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

DISCARDED_NAME = "metrics.discarded.jsonl"

# Peak dense bf16 FLOP/s per device (chip) by jax ``device_kind`` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs per device of a compiled executable, if the backend's cost analysis has them."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def analytic_flops_per_step(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of one global step (forward + backward = 3x forward; remat not counted, as MFU is defined).

  Per token: ``6 x`` the parameters of one expert layer per layer (each token meets exactly one
  expert), ``6 E V`` for the lm_head on und tokens, and ``12 Hq D L/2`` per layer for the
  attention scores and values (causal upper bound for a packed row of length L). XLA's cost
  analysis is not used for MFU: it counts a scanned layer body once and a Pallas kernel as zero.
  """
  m, d = config.model, config.data
  e, f, hq, hkv, hd = m.hidden_size, m.mlp_dim, m.num_heads, m.num_kv_heads, m.head_dim
  per_layer = 2 * e * hq * hd + 2 * e * hkv * hd + 3 * e * f  # q, o, k, v, mlp of one expert
  seq = d.und_len + d.gen_len
  per_row = (6 * seq * m.num_layers * per_layer
             + 6 * d.und_len * e * m.vocab_size
             + 12 * m.num_layers * hq * hd * seq * (seq / 2))
  return float(d.batch_size * per_row)


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  """Token slots of one global step: rows x (und + gen) (padding included, as the step computes it)."""
  return config.data.batch_size * (config.data.und_len + config.data.gen_len)


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What a measured step time means on this mesh: tokens/s and, where the peak is known, MFU."""

  tokens_per_step: int
  flops_per_device: float  # analytic model FLOPs of one step, per device
  peak: float | None  # the device's peak FLOP/s

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, mesh) -> "Throughput":
    return cls(tokens_per_step(config), analytic_flops_per_step(config) / mesh.size,
               peak_flops(mesh.devices.flat[0]))

  def rates(self, step_time: float) -> dict[str, float]:
    """``step_time_s``, ``tokens_per_s`` and (with a known peak) ``mfu`` of one step time."""
    out = dict(step_time_s=step_time, tokens_per_s=self.tokens_per_step / step_time)
    if self.peak:
      out["mfu"] = self.flops_per_device / step_time / self.peak
    return out


class MetricsWriter:
  """Appends one JSON line per logged step and mirrors scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    """A resumed run recomputes steps after its checkpoint: their old lines move to
    ``metrics.discarded.jsonl`` (appended, never lost) before the run writes new ones."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept, dropped = [], []
    for line in lines:
      (kept if json.loads(line)["step"] <= step else dropped).append(line)
    if dropped:
      discarded = os.path.join(os.path.dirname(self.path), DISCARDED_NAME)
      with open(discarded, "a") as f:
        f.writelines(dropped)
      if step == 0:
        logging.warning("%s: restarting from step 0; its %d earlier lines moved to %s", self.path, len(dropped),
                        discarded)
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, float):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
