"""Factored Linen Dense layers: the module `jaxcomp.factorize` returns for a Linen model.

A factored ``nn.Dense`` keeps its path; its ``kernel`` param gives way to ``lowrank_a`` (K, r)
and ``lowrank_b`` (r, N) (boxed like the kernel: ``(in name, None)`` / ``(None, out name)``,
with the stack axis of an ``nn.scan`` / ``nn.vmap`` stack, which slices them as any param).
`LowRankLinen` runs the original module under `flax.linen.intercept_methods` and computes such
a layer as ``(x @ a) @ b + bias``; every other layer runs as written.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta


def _factored_call(next_fun, args, kwargs, context):
  m = context.module
  if (type(m) is not nn.Dense or context.method_name != "__call__" or m.scope is None
      or not m.scope.has_variable("params", "lowrank_a")):
    return next_fun(*args, **kwargs)
  a = meta.unbox(m.scope.get_variable("params", "lowrank_a"))
  b = meta.unbox(m.scope.get_variable("params", "lowrank_b"))
  bias = meta.unbox(m.scope.get_variable("params", "bias")) if m.use_bias else None
  x, a, b, bias = m.promote_dtype(args[0], a, b, bias, dtype=m.dtype)
  last = lambda t: (((t.ndim - 1,), (0,)), ((), ()))
  y = jax.lax.dot_general(x, a, last(x), precision=m.precision)
  y = jax.lax.dot_general(y, b, last(y), precision=m.precision)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


class LowRankLinen(nn.Module):
  """Runs ``inner`` with its factored Dense layers as ``(x @ lowrank_a) @ lowrank_b + bias``.

  Attributes:
    inner: the original Linen module (same variable layout, factored kernels replaced).

  Example::

    module, variables = jc.factorize(model, recipe, variables=variables, args=(x,))
    module.apply(variables, x)             # module: LowRankLinen(inner=model)
  """

  inner: nn.Module

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    with nn.intercept_methods(_factored_call):
      return self.inner(*args, **kwargs)
