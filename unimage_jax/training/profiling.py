"""``config.train.profile_steps="a,b"``: a ``jax.profiler`` trace of steps a..b into the workdir.

Why steps and not seconds: the first steps compile and warm up, so the trace should cover chosen
steady-state steps; the trace is written as ``<workdir>/profile/plugins/profile/<run>/*.xplane.pb``,
which TensorBoard's profile plugin (``tensorboard --logdir <workdir>/profile``) opens.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def parse_steps(spec: str) -> tuple[int, int] | None:
  """``"a,b"`` -> (a, b), 1-based and inclusive; ``""`` -> None. Raises ValueError naming the field."""
  if not spec:
    return None
  parts = str(spec).replace(" ", "").split(",")
  try:
    first, last = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"config.train.profile_steps={spec!r} must be 'a,b' (first and last step to trace, "
                     "e.g. '5,7')") from None
  if not 1 <= first <= last:
    raise ValueError(f"config.train.profile_steps={spec!r} needs 1 <= first <= last")
  return first, last


class StepProfiler:
  """Starts the trace before step ``first`` runs and stops it after step ``last`` (1-based)."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_steps(spec)
    self.directory = os.path.join(os.path.abspath(workdir), "profile")
    self.active = False

  def before(self, step: int) -> None:
    """Called with the 1-based number of the step about to run."""
    if self.window and step == self.window[0] and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("profiling steps %d..%d into %s", *self.window, self.directory)

  def after(self, step: int, outputs=None) -> None:
    """Called after the 1-based step ``step`` was dispatched; waits for it before stopping."""
    if self.active and step >= self.window[1]:
      if outputs is not None:
        jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written to %s (tensorboard --logdir %s)", self.directory, self.directory)
