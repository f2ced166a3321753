"""Small building blocks shared by the MoT decoder and the ViT: params with logical axes, norms, MLPs.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (one name per dimension);
``unimage_jax.sharding`` maps those names to mesh axes through the config's rules. Weights are
stored in ``param_dtype`` and cast to the compute dtype at the point of use.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unimage_jax import cpu_backend
from unimage_jax.model import constraints

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
normal_init: Initializer = jax.nn.initializers.normal(0.02)
zeros_init: Initializer = jax.nn.initializers.zeros
ones_init: Initializer = jax.nn.initializers.ones


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
  """An nnx.Param with one logical axis name per dimension."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def _contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out]."""
  return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract_cpu(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """:func:`_contract` whose kernel gradient transposes the layer's input, not its output gradient.

  Why. The kernel gradient contracts the token axis of both the input ``x [T, I]`` and the output
  gradient ``dy [T, O]``. Left to autodiff, XLA:CPU writes ``dy`` transposed (for the MLP's gate
  and up projections, ``[T, 768]`` from a fused elementwise loop, about 8 ns an element) so that
  its dot reads row-major operands; transposing the input instead moves 3x fewer elements, and
  the tiny train step takes 0.95x the time (BENCHMARKS.md, "The dense layers' kernel gradient on
  the CPU"). Same values as autodiff's gradient (``tests/test_dense_product.py``).
  """
  return _contract(x, kernel, n_in)


def _contract_cpu_fwd(x, kernel, n_in):
  return _contract(x, kernel, n_in), (x, kernel)


def _contract_cpu_bwd(n_in, residuals, dy):
  x, kernel = residuals
  n_out = kernel.ndim - n_in
  tokens = math.prod(x.shape[:x.ndim - n_in])
  x2 = x.reshape(tokens, -1)  # [T, I]
  dy2 = dy.reshape(tokens, -1)  # [T, O]
  d_kernel = (jnp.transpose(x2) @ dy2).reshape(kernel.shape)  # [I, T] @ [T, O]
  # dx = dy @ kernel^T, contracting the kernel's trailing (output) dims
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())))
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


_contract_cpu.defvjp(_contract_cpu_fwd, _contract_cpu_bwd)


def dense_product(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """``x [..., *in] @ kernel [*in, *out]``; programs lowered for the CPU take :func:`_contract_cpu`'s
  backward, every other platform (and an ahead-of-time TPU compile on a CPU host) autodiff's."""
  if not cpu_backend.transposed_input_dense_grad():
    return _contract(x, kernel, n_in)
  return jax.lax.platform_dependent(x, kernel, cpu=lambda x, k: _contract_cpu(x, k, n_in),
                                    default=lambda x, k: _contract(x, k, n_in))


class Dense(nnx.Module):
  """``y = x @ W (+ b)`` where W is ``[*in_shape, *out_shape]``; contracts the trailing ``len(in_shape)`` dims."""

  def __init__(
      self,
      in_shape: Sequence[int],
      out_shape: Sequence[int],
      in_axes: Sequence[str | None],
      out_axes: Sequence[str | None],
      *,
      use_bias: bool,
      param_dtype: jnp.dtype,
      rngs: nnx.Rngs,
      kernel_init: Initializer = normal_init,
  ):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.kernel = make_param(rngs, kernel_init, [*in_shape, *out_shape], [*in_axes, *out_axes], param_dtype)
    self.bias = make_param(rngs, zeros_init, out_shape, out_axes, param_dtype) if use_bias else None

  def __call__(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    y = dense_product(x.astype(dtype), self.kernel[...].astype(dtype), len(self.in_shape))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class RMSNorm(nnx.Module):
  """HF Qwen2 RMSNorm: ``w * x / sqrt(mean(x^2) + eps)`` computed in fp32, cast back."""

  def __init__(self, dim: int, eps: float, axis_name: str, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = make_param(rngs, ones_init, [dim], [axis_name], param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm (SigLIP), statistics in fp32."""

  def __init__(self, dim: int, eps: float, axis_name: str, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, ones_init, [dim], [axis_name], param_dtype)
    self.bias = make_param(rngs, zeros_init, [dim], [axis_name], param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class SwiGLU(nnx.Module):
  """Qwen2 MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

  def __init__(self, hidden: int, mlp: int, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense([hidden], [mlp], ["embed"], ["mlp"], **kw)
    self.up_proj = Dense([hidden], [mlp], ["embed"], ["mlp"], **kw)
    self.down_proj = Dense([mlp], [hidden], ["mlp"], ["embed"], **kw)

  def __call__(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x [B, l, E] -> [B, l, E]; the [B, l, mlp] hidden follows the ``act_mlp`` rule."""
    hidden = jax.nn.silu(self.gate_proj(x, dtype)) * self.up_proj(x, dtype)  # [B, l, mlp]
    if hidden.ndim == 3:
      hidden = constraints.constrain(hidden, constraints.MLP)
    return self.down_proj(hidden, dtype)
