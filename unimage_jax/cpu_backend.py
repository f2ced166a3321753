"""XLA:CPU settings for the tools: YNNPACK dot fusions, on unless the user chose otherwise.

Why. On a CPU the tiny train step is bound by its matmuls, and XLA:CPU's own dot emitter is
about 1.6x slower than YNNPACK's on the step's shapes (BENCHMARKS.md, "Train step against
eager PyTorch"); with ``--xla_cpu_experimental_ynn_fusion_type=dot`` the jitted step is as fast as
eager PyTorch with oneDNN. The flag only touches the CPU backend (TPU and GPU programs are
unchanged) and must be in ``XLA_FLAGS`` before the first backend starts, so :func:`configure`
runs at tool start-up (``cli.run``). ``UNIMAGE_CPU_DOTS=xla`` keeps XLA's own dots; an
``XLA_FLAGS`` that already names a YNN fusion type is left alone.

The dense layers' kernel gradient has a CPU rule of its own (:func:`unimage_jax.model.layers.
dense_product`); ``UNIMAGE_CPU_DENSE_GRAD=autodiff`` keeps autodiff's, to measure the difference.
"""

from __future__ import annotations

import os

YNN_DOTS = "--xla_cpu_experimental_ynn_fusion_type=dot"
# the first jaxlib this was measured on; older XLA builds abort on a flag they do not know
MIN_JAXLIB = (0, 10, 2)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    from jaxlib import version
  except ImportError:
    return ()
  return tuple(int(p) for p in version.__version__.split(".")[:3] if p.isdigit())


def configure(environ=os.environ) -> bool:
  """Adds :data:`YNN_DOTS` to ``XLA_FLAGS`` when allowed; returns whether it is now set."""
  flags = environ.get("XLA_FLAGS", "")
  if "ynn_fusion_type" in flags:
    return YNN_DOTS in flags.split()
  if environ.get("UNIMAGE_CPU_DOTS", "ynn") != "ynn" or _jaxlib_version() < MIN_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_DOTS}".strip()
  return True


def transposed_input_dense_grad(environ=os.environ) -> bool:
  """Whether CPU programs take the dense layers' transposed-input kernel gradient (the default);
  ``UNIMAGE_CPU_DENSE_GRAD=autodiff`` turns it off. Read when a program is traced."""
  choice = environ.get("UNIMAGE_CPU_DENSE_GRAD", "transposed_input")
  if choice not in ("transposed_input", "autodiff"):
    raise ValueError(f"UNIMAGE_CPU_DENSE_GRAD={choice!r}: expected 'transposed_input' or 'autodiff'")
  return choice == "transposed_input"
