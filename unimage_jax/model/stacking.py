"""Layer stacking: N identically shaped modules stored as one module with a leading ``layers`` axis.

Why: ``lax.scan`` over stacked parameters makes compile time independent of depth, and the
stacked layout is also what FSDP shards most simply. The same parameters also run unrolled
(``scan=False``), so checkpoints do not depend on that choice.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# The jax checkpoint policy of each name in ``choices.REMAT_POLICIES`` (None: no remat); a test
# (tests/test_config_validation.py) keeps the two in step.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def stack_modules(factory: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
  """``count`` independently initialised ``factory`` modules, merged into one stacked module."""
  keys = jax.random.split(rngs.params(), count)
  graphdef = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))[0]
  stacked = jax.vmap(lambda key: nnx.split(factory(nnx.Rngs(params=key)))[1])(keys)
  stacked = jax.tree.map(
      lambda v: v.replace(logical_axes=("layers", *v.logical_axes)),
      stacked,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.merge(graphdef, stacked)


def scan_stacked(
    stacked_module: nnx.Module,
    carry: Any,
    apply: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    xs: Any,
    *,
    scan: bool,
    remat_policy: str,
) -> tuple[Any, Any]:
  """Runs ``carry, y = apply(layer, carry, x)`` over the stacked layers (scanned or unrolled, maybe
  remat), ``x`` being each layer's slice of ``xs`` (leading ``layers`` axis, or None); returns the
  last carry and the ``y`` stacked along a leading ``layers`` axis, as ``lax.scan`` does."""
  graphdef, stacked = nnx.split(stacked_module)
  count = jax.tree.leaves(stacked)[0].shape[0]

  def body(carry, layer_xs):
    layer_state, x = layer_xs
    return apply(nnx.merge(graphdef, layer_state), carry, x)

  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
  if remat_policy != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
  if scan:
    return jax.lax.scan(body, carry, (stacked, xs))
  ys = []
  for i in range(count):
    carry, y = body(carry, jax.tree.map(lambda a: a[i], (stacked, xs)))
    ys.append(y)
  return carry, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *ys)


def run_stacked(
    stacked_module: nnx.Module,
    carry: Any,
    apply: Callable[[nnx.Module, Any], Any],
    *,
    scan: bool,
    remat_policy: str,
) -> Any:
  """Runs ``carry = apply(layer, carry)`` over the stacked layers (scanned or unrolled, maybe remat)."""
  return scan_stacked(stacked_module, carry, lambda layer, c, _: (apply(layer, c), None), None,
                      scan=scan, remat_policy=remat_policy)[0]
