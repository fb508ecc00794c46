"""Low-rank Linen rewrites: factored Dense layers (`LowRankLinen`, what `jaxcomp.factorize`
returns for a Linen model) and LoRA adapters (`LoRALinen`, what `jaxcomp.add_lora` returns).

A factored ``nn.Dense`` keeps its path; its ``kernel`` param gives way to ``lowrank_a`` (K, r)
and ``lowrank_b`` (r, N) (boxed like the kernel: ``(in name, None)`` / ``(None, out name)``,
with the stack axis of an ``nn.scan`` / ``nn.vmap`` stack, which slices them as any param).
`LowRankLinen` runs the original module under `flax.linen.intercept_methods` and computes such
a layer as ``(x @ a) @ b + bias``; every other layer runs as written.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from jaxcomp.rewrite.linen_quant import PackedParam, _already_quantized, box_value, fresh_dicts


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


def _boxed(kernel: Any, value: jax.Array, names: tuple[Any, Any]) -> Any:
  """``value`` in the box of ``kernel`` (one layer's) with ``names``; plain when unboxed."""
  if isinstance(kernel, meta.Partitioned):
    return kernel.replace(value=value, names=names)
  return value


def _lora_call(pattern: str, rank: int, alpha: float, next_fun, args, kwargs, context):
  """``base(x) + (alpha / r) (x @ lora_a) @ lora_b`` for a matched Dense; creates the adapter
  params (``lora_b`` zero) when params are mutable."""
  m = context.module
  if (type(m) is not nn.Dense or context.method_name != "__call__" or m.scope is None
      or not re.fullmatch(pattern, "/".join(m.path)) or _already_quantized(m)):
    return next_fun(*args, **kwargs)
  y = next_fun(*args, **kwargs)
  kernel = m.scope.get_variable("params", "kernel")
  k, n = meta.unbox(kernel).shape
  if not 1 <= rank <= min(k, n):
    raise ValueError(f"{'/'.join(m.path)}: LoRA rank must be in [1, min(in, out) = "
                     f"{min(k, n)}], got {rank}")
  names = getattr(kernel, "names", None) or (None, None)
  init_a = lambda key: _boxed(kernel, nn.initializers.he_uniform()(key, (k, rank), jnp.float32),
                              (names[0], None))
  init_b = lambda _: _boxed(kernel, jnp.zeros((rank, n), jnp.float32), (None, names[-1]))
  a = meta.unbox(m.scope.param("lora_a", init_a))
  b = meta.unbox(m.scope.param("lora_b", init_b))
  lora = (args[0].astype(jnp.float32) @ a) @ b
  return y + (alpha / rank * lora).astype(y.dtype)


class LoRALinen(nn.Module):
  """Runs ``inner`` with a LoRA adapter on each ``nn.Dense`` whose path fully matches
  ``pattern``: ``y = base(x) + (alpha / rank) (x @ lora_a) @ lora_b`` (Hu et al. 2021). The
  adapters are params ``lora_a`` (K, r) and ``lora_b`` (r, N) beside the kernel (boxed like it;
  under ``nn.scan`` stacked like it); train them alone with an optax mask on those names.

  Attributes:
    base: the Linen module (float, or the `QuantizedLinen` of `jaxcomp.quantize`: QLoRA).
    pattern: regex on the Dense layer paths.
    rank: adapter rank.
    alpha: the LoRA scale numerator.

  Example::

    module, variables = jc.add_lora(model, r".*up", rank=4, rngs=nnx.Rngs(0),
                                    variables=variables, args=(x,))
    module.apply(variables, x)
  """

  base: nn.Module
  pattern: str
  rank: int
  alpha: float = 16.0

  def setup(self):
    nn.share_scope(self, self.base)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    call = functools.partial(_lora_call, self.pattern, self.rank, self.alpha)
    with nn.intercept_methods(call):
      return self.base(*args, **kwargs)


def add_lora_linen(module: nn.Module, pattern: str, *, rank: int, alpha: float, key: jax.Array,
                   variables: Any, args: tuple, kwargs: dict | None = None
                   ) -> tuple[LoRALinen, Any]:
  """``(LoRALinen(module, ...), variables with fresh adapters)``; ``variables`` untouched."""
  if variables is None or "params" not in variables or not args:
    raise ValueError("add_lora: a Linen module needs variables= (with its 'params') and "
                     "args=(example inputs,)")
  wrapped = LoRALinen(base=module, pattern=pattern, rank=rank, alpha=float(alpha))
  kwargs = kwargs or {}
  apply = functools.partial(wrapped.apply, mutable=["params"], rngs={"params": key})
  _, updates = jax.jit(lambda v, *a: apply(v, *a, **kwargs))(variables, *args)
  new = fresh_dicts(dict(variables))
  added = []

  def merge(dst, src, path):
    for k, v in src.items():
      if isinstance(v, Mapping):
        merge(dst.setdefault(k, {}), v, path + (k,))
      elif k not in dst:
        dst[k] = v
        added.append("/".join(path))

  merge(new["params"], fresh_dicts(updates)["params"], ())
  if not added:
    raise ValueError(f"add_lora: pattern {pattern!r} matches no nn.Dense layer the module calls")
  return wrapped, new


def _stacked_delta(kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` per layer, laid out as ``kernel`` (2-D, or stacked at one axis)."""
  if kernel.ndim == 2:
    return a @ b
  for axis in range(3):
    drop = lambda s: s[:axis] + s[axis + 1:]
    (k, n), (ka, r), (rb, nb) = drop(kernel.shape), drop(a.shape), drop(b.shape)
    if (k, n, r) == (ka, nb, rb) and a.shape[axis] == b.shape[axis] == kernel.shape[axis]:
      delta = jnp.einsum("lkr,lrn->lkn", jnp.moveaxis(a, axis, 0), jnp.moveaxis(b, axis, 0))
      return jnp.moveaxis(delta, 0, axis)
  raise ValueError(f"merge_lora: adapters {a.shape} @ {b.shape} do not fit kernel {kernel.shape}")


def merge_lora_linen(module: LoRALinen, variables: Any) -> tuple[nn.Module, Any]:
  """``(module.base, variables with each kernel + (alpha / r) a @ b, adapters removed)``."""
  if not isinstance(module, LoRALinen):
    raise TypeError(f"merge_lora: a Linen module must be the LoRALinen add_lora returned, got "
                    f"{type(module).__name__}")
  scale = module.alpha / module.rank
  new = fresh_dicts(dict(variables))

  def walk(node, path):
    if "lora_a" in node:
      kernel = node["kernel"]
      if isinstance(kernel, PackedParam):
        raise ValueError(f"{path}: merge_lora needs a float (or fake-quantized) base kernel, "
                         "not a packed QArray; merge before jc.convert")
      value = jnp.asarray(box_value(kernel))
      a, b = box_value(node.pop("lora_a")), box_value(node.pop("lora_b"))
      merged = (value.astype(jnp.float32) + scale * _stacked_delta(value, a, b)).astype(
          value.dtype)
      node["kernel"] = kernel.replace_boxed(merged) if isinstance(
          kernel, meta.AxisMetadata) else merged
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{path}/{k}" if path else k)

  walk(new["params"], "")
  return module.base, new
