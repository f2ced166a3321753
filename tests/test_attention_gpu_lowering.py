"""The Pallas Triton kernels lower for CUDA on a CPU-only host (jax.export cross-lowering):
Pallas -> Triton IR for the forward, dQ and dK/dV kernels. Compiling Triton IR to PTX/cubin and
running it needs a GPU (tools/bench_attention.py --mode=gpu)."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from unimage_jax.attention import attention
from unimage_jax.layout import TokenMeta

TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("dtype,heads,d,length", [
    (jnp.bfloat16, (28, 4), 128, 1000),  # bagel_7b heads, ragged length
    (jnp.float32, (2, 2), 48, 256),  # head dim padded to 64
])
def test_gpu_kernel_lowers_for_cuda(dtype, heads, d, length):
  hq, hkv = heads

  def step(q, k, v, meta):
    loss = lambda q, k, v: jnp.sum(
        attention(q, k, v, meta, impl="pallas_gpu", interpret=False).astype(jnp.float32))
    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

  args = (jax.ShapeDtypeStruct((1, length, hq, d), dtype),
          jax.ShapeDtypeStruct((1, length, hkv, d), dtype),
          jax.ShapeDtypeStruct((1, length, hkv, d), dtype),
          TokenMeta(*[jax.ShapeDtypeStruct((1, length), jnp.int32)] * 4))
  exp = export.export(jax.jit(step), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  text = exp.mlir_module()
  for name in ("mot_flash_fwd_gpu", "mot_flash_dq_gpu", "mot_flash_dkv_gpu"):
    assert f'name = "{name}"' in text, name
