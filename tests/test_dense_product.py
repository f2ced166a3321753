"""The dense layers' product: its CPU backward (input transposed for the kernel gradient) gives
autodiff's values, for the multi-axis shapes the attention projections use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimage_jax.model import layers


@pytest.mark.parametrize("x_shape, k_shape, n_in", [
    ((2, 7, 16), (16, 24), 1),  # an MLP projection
    ((2, 7, 16), (16, 4, 8), 1),  # q/k/v: [E] -> [H, D]
    ((2, 7, 4, 8), (4, 8, 16), 2),  # o_proj: [H, D] -> [E]
    ((5, 16), (16, 3), 1),  # no length axis
])
def test_cpu_backward_matches_autodiff(x_shape, k_shape, n_in):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
  out_shape = x_shape[:len(x_shape) - n_in] + k_shape[n_in:]
  probe = jnp.asarray(rng.normal(size=out_shape), jnp.float32)  # a loss that weighs every output

  def loss(product):
    return lambda x, k: jnp.sum(jnp.tanh(product(x, k, n_in)) * probe)

  want_y = layers._contract(x, kernel, n_in)
  got_y = jax.jit(layers.dense_product, static_argnums=2)(x, kernel, n_in)
  assert got_y.shape == out_shape
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  want = jax.grad(loss(layers._contract), argnums=(0, 1))(x, kernel)
  for product in (layers._contract_cpu, layers.dense_product):  # the CPU rule itself, and as dispatched
    got = jax.jit(jax.grad(loss(product), argnums=(0, 1)))(x, kernel)
    for g, w in zip(got, want):
      assert g.shape == w.shape and g.dtype == w.dtype
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_other_platforms_keep_autodiffs_backward():
  """Lowered for a GPU, the program has no trace of the CPU rule's transposed input ([10, 16] tokens
  x features -> [16, 10])."""
  x = jax.ShapeDtypeStruct((2, 5, 16), jnp.float32)
  kernel = jax.ShapeDtypeStruct((16, 24), jnp.float32)
  grad = jax.grad(lambda x, k: jnp.sum(layers.dense_product(x, k, 1)), argnums=1)
  cpu_text = jax.jit(grad).trace(x, kernel).lower(lowering_platforms=("cpu",)).as_text()
  cuda_text = jax.jit(grad).trace(x, kernel).lower(lowering_platforms=("cuda",)).as_text()
  transposed_input = "(tensor<10x16xf32>) -> tensor<16x10xf32>"
  assert transposed_input in cpu_text
  assert transposed_input not in cuda_text


def test_the_autodiff_switch(monkeypatch):
  """``UNIMAGE_CPU_DENSE_GRAD=autodiff`` lowers without the transposed input; a typo is an error."""
  x = jax.ShapeDtypeStruct((2, 5, 16), jnp.float32)
  kernel = jax.ShapeDtypeStruct((16, 24), jnp.float32)
  def grad():  # a fresh function each time: the switch is read when a program is traced
    return jax.grad(lambda x, k: jnp.sum(layers.dense_product(x, k, 1)), argnums=1)

  monkeypatch.setenv("UNIMAGE_CPU_DENSE_GRAD", "autodiff")
  text = jax.jit(grad()).trace(x, kernel).lower(lowering_platforms=("cpu",)).as_text()
  assert "(tensor<10x16xf32>) -> tensor<16x10xf32>" not in text
  monkeypatch.setenv("UNIMAGE_CPU_DENSE_GRAD", "transpose")
  with pytest.raises(ValueError, match="UNIMAGE_CPU_DENSE_GRAD='transpose'"):
    jax.jit(grad()).trace(x, kernel)
