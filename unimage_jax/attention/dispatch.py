"""One entry point for MoT attention: ``attention(q, k, v, q_meta, ...)`` with a chosen backend.

``impl``:
* ``"xla"``        the pure-XLA reference (:func:`reference_attention`), any backend: the oracle;
* ``"xla_flash"``  block-skipping flash attention in plain XLA (:mod:`blocked_xla`), any backend:
                   the fast path on the CPU (same function, tile-sized working set);
* ``"pallas_tpu"`` the Mosaic TPU kernel (:mod:`pallas_tpu`);
* ``"pallas_gpu"`` the Pallas Triton kernel (:mod:`pallas_gpu`);
* ``"auto"``       pallas_tpu on TPU, pallas_gpu on GPU, xla_flash on CPU.

``interpret=None`` runs a Pallas kernel in interpret mode exactly when the default backend is the
CPU, so the kernels can be exercised (slowly) in CPU tests.
"""

from __future__ import annotations

import jax

from unimage_jax.attention.reference import reference_attention
from unimage_jax.choices import ATTENTION_IMPLS as IMPLS, XLA_ATTENTION_IMPLS as XLA_IMPLS  # noqa: F401 (re-exported)
from unimage_jax.layout import TokenMeta

# Default tiles per kernel (block_q, block_k): MXU-sized on TPU, Triton-sized on GPU.
DEFAULT_BLOCKS = {"pallas_tpu": (256, 512), "pallas_gpu": (64, 64)}


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """Maps ``"auto"`` to a concrete implementation for ``backend`` (default: jax's backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend, "xla_flash")


def attention(
    q: jax.Array,  # [B, Lq, Hq, D]
    k: jax.Array,  # [B, Lk, Hkv, D]
    v: jax.Array,  # [B, Lk, Hkv, D]
    q_meta: TokenMeta,  # fields int32 [B, Lq]
    k_meta: TokenMeta | None = None,  # defaults to q_meta (self-attention over the packed row)
    *,
    impl: str = "xla",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    query_chunk: int = 1024,
    scale: float | None = None,
) -> jax.Array:  # [B, Lq, Hq, D], dtype of q
  """MoT generalized-causal attention; every impl computes the same function (scale D**-0.5)."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference_attention(q, k, v, q_meta, k_meta, scale=scale, query_chunk=query_chunk)
  if impl == "xla_flash":
    from unimage_jax.attention.blocked_xla import DEFAULT_BLOCK, blocked_attention
    return blocked_attention(q, k, v, q_meta, k_meta, scale=scale, block_q=block_q or DEFAULT_BLOCK,
                             block_k=block_k or DEFAULT_BLOCK)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  dq, dk = DEFAULT_BLOCKS[impl]
  block_q = dq if block_q is None else block_q
  block_k = dk if block_k is None else block_k
  if impl == "pallas_tpu":
    from unimage_jax.attention import pallas_tpu
    return pallas_tpu.flash_attention(q, k, v, q_meta, k_meta, scale=scale, block_q=block_q,
                                      block_k=block_k, interpret=interpret)
  from unimage_jax.attention import pallas_gpu
  return pallas_gpu.flash_attention(q, k, v, q_meta, k_meta, scale=scale, block_q=block_q,
                                    block_k=block_k, interpret=interpret)
