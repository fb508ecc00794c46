"""Rewrites of Flax Linen modules: interception inside a wrapper, plus a pure variable transform.

Linen modules are built lazily by their call, so a rewrite cannot swap nodes ahead of time.
Instead `QuantizedLinen` runs the original module under `flax.linen.intercept_methods`: each
call of a matched Dense / DenseGeneral / Conv is re-issued on a clone whose ``dot_general`` /
``conv_general_dilated`` injection point is the quantized dot, and Einsum / Embed are computed
with the same `jaxcomp.quant` functions. The wrapper shares the inner module's scope
(`nn.share_scope`), so parameter paths stay exactly as they were; learned step sizes are added
next to their kernel as ``w_step``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax.core import meta

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant import dot as qdot
from jaxcomp.quant.qarray import QArray, initial_step
from jaxcomp.quant.spec import Quant
from jaxcomp.recipe import MatchReport, Recipe
from jaxcomp.rewrite.engine import kernel_axes

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed)


class _QuantDotFn:
  """A ``dot_general`` bound to a spec and a step (marks a clone as already quantized)."""

  def __init__(self, spec: Quant, w_step: jax.Array | None, backend: str):
    self.spec, self.w_step, self.backend = spec, w_step, backend

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               **unused):
    return qdot.quant_dot_general(lhs, rhs, dimension_numbers, self.spec, w_step=self.w_step,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type,
                                  backend=self.backend)


class _QuantConvFn(_QuantDotFn):

  def __call__(self, lhs, rhs, *args, **kwargs):
    kwargs.pop("out_sharding", None)
    return qdot.quant_conv_general_dilated(lhs, rhs, *args, spec=self.spec, w_step=self.w_step,
                                           **kwargs)


class PackedParam(struct.PyTreeNode, meta.AxisMetadata):
  """A packed kernel in a Linen ``params`` tree (what `jaxcomp.convert` puts there).

  Linen layers read their kernel with ``self.param``, which unboxes it and checks its shape;
  unboxing gives the dequantized kernel in its logical shape (``nn.unbox`` of packed variables
  yields float weights equal to the fake-quant ones). The quantized layer call never uses that
  value (dead code under ``jit``): its injection point contracts with ``value``, the `QArray`.

  Example:
    >>> from jaxcomp.quant.qarray import quantize_weight
    >>> box = PackedParam(quantize_weight(jnp.ones((8, 4)), (0,), jc.Quant(w_bits=4)))
    >>> box.unbox().shape
    (8, 4)
  """

  value: QArray

  def unbox(self) -> jax.Array:
    return self.value.dequantize()

  def replace_boxed(self, val: Any) -> PackedParam:
    return self.replace(value=val)

  def add_axis(self, index: int, params: dict[Any, Any]) -> PackedParam:
    raise ValueError("packed kernels cannot be lifted over nn.scan / nn.vmap axes")

  def remove_axis(self, index: int, params: dict[Any, Any]) -> PackedParam:
    raise ValueError("packed kernels cannot be lifted over nn.scan / nn.vmap axes")


class _PackedDotFn(_QuantDotFn):
  """A ``dot_general`` that contracts with a packed `QArray` instead of the kernel it is given
  (the layer's own call runs, with the unboxed stand-in as its kernel)."""

  def __init__(self, spec: Quant, packed: QArray, backend: str):
    super().__init__(spec, None, backend)
    self.packed = packed

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               **unused):
    del rhs  # the stand-in
    return qdot.quant_dot_general(lhs, self.packed, dimension_numbers, self.spec,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type,
                                  backend=self.backend)


class _PackedConvFn(_PackedDotFn):

  def __call__(self, lhs, rhs, *args, **kwargs):
    del rhs
    kwargs.pop("out_sharding", None)
    return qdot.quant_conv_general_dilated(lhs, self.packed, *args, spec=self.spec, **kwargs)


def _packed_call(m: nn.Module, method: str, spec: Quant, packed: QArray, args, kwargs,
                 backend: str) -> Any:
  """A matched layer whose kernel is a packed `QArray` (after `convert_linen`)."""
  if isinstance(m, nn.Embed):
    if method == "attend":
      (query,) = m.promote_dtype(args[0], dtype=m.dtype)
      return qdot.quant_dot_general(query, packed, (((query.ndim - 1,), (1,)), ((), ())), spec,
                                    backend=backend)
    (rows,) = m.promote_dtype(qlayers.packed_rows(packed, args[0]), dtype=m.dtype, inexact=False)
    return rows
  if isinstance(m, nn.Einsum):
    einsum_str = _einsum_str(m, args, kwargs)
    bias = m.scope.get_variable("params", "bias") if m.use_bias else None
    inputs, bias = m.promote_dtype(args[0], bias, dtype=m.dtype)
    dims, perm = qlayers.einsum_dimension_numbers(einsum_str, inputs.ndim, len(packed.shape))
    y = jnp.transpose(qdot.quant_dot_general(
        inputs, packed, dims, spec, precision=m.precision,
        preferred_element_type=m.preferred_element_type, backend=backend), perm)
    if bias is not None:
      stand_in = jax.ShapeDtypeStruct(packed.shape, inputs.dtype)
      _, shape = m._get_bias_shape(einsum_str.replace(" ", ""), inputs, stand_in)  # pylint: disable=protected-access
      y = y + jnp.reshape(bias, shape)
    return y
  # Dense / DenseGeneral / Conv: the layer's own call (shapes, bias, dtypes) with the packed
  # kernel at its injection point.
  if isinstance(m, nn.Conv):
    clone = m.clone(parent=m.scope, conv_general_dilated=_PackedConvFn(spec, packed, backend),
                    conv_general_dilated_cls=None)
  else:
    clone = m.clone(parent=m.scope, dot_general=_PackedDotFn(spec, packed, backend),
                    dot_general_cls=None)
  return getattr(clone, method)(*args, **kwargs)


def _contracting(m: nn.Module, kernel: jax.Array, einsum_str: str | None) -> tuple[int, ...]:
  return kernel_axes(m, kernel_ndim=kernel.ndim, einsum_str=einsum_str).contracting


def _kernel_name(m: nn.Module) -> str:
  return "embedding" if isinstance(m, nn.Embed) else "kernel"


def _step(m: nn.Module, spec: Quant, contracting: tuple[int, ...]) -> jax.Array | None:
  """The layer's LSQ step: read, or (when params are mutable) created from the kernel."""
  if not spec.learn_scale:
    return None
  kernel = m.scope.get_variable("params", _kernel_name(m))
  init = lambda *_: initial_step(kernel, contracting, spec)
  if m.scope.has_variable("params", "w_step"):
    return m.scope.get_variable("params", "w_step")
  if m.scope.is_mutable_collection("params"):
    return m.scope.param("w_step", init)
  raise ValueError(
      f"{'/'.join(m.path)}: no 'w_step' param; build the variables with "
      "jc.quantize(module, recipe, variables=..., args=...) or module.init")


def _einsum_str(m: nn.Module, args: tuple, kwargs: dict) -> str | None:
  if not isinstance(m, nn.Einsum):
    return None
  return kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or m.einsum_str


def _quantized_call(m: nn.Module, method: str, spec: Quant, args, kwargs, backend: str) -> Any:
  einsum_str = _einsum_str(m, args, kwargs)
  kernel = m.scope.get_variable("params", _kernel_name(m))
  if isinstance(kernel, PackedParam):
    return _packed_call(m, method, spec, kernel.value, args, kwargs, backend)
  contracting = _contracting(m, kernel, einsum_str)
  step = _step(m, spec, contracting)
  if isinstance(m, (nn.Dense, nn.DenseGeneral)):
    clone = m.clone(parent=m.scope, dot_general=_QuantDotFn(spec, step, backend),
                    dot_general_cls=None)
    return getattr(clone, method)(*args, **kwargs)
  if isinstance(m, nn.Conv):
    clone = m.clone(parent=m.scope, conv_general_dilated=_QuantConvFn(spec, step, backend),
                    conv_general_dilated_cls=None)
    return getattr(clone, method)(*args, **kwargs)
  if isinstance(m, nn.Embed):
    if method == "attend":  # a tied output head: through the quantized dot (W8A8 with a_bits)
      query, table = m.promote_dtype(args[0], kernel, dtype=m.dtype)
      dims = (((query.ndim - 1,), (1,)), ((), ()))
      return qdot.quant_dot_general(query, table, dims, spec, w_step=step, backend=backend)
    table = qdot.fake_quant_weight(kernel, contracting, spec, step)
    (table,) = m.promote_dtype(table, dtype=m.dtype, inexact=False)
    return jnp.take(table, args[0], axis=0)
  # nn.Einsum
  inputs = args[0]
  bias = m.scope.get_variable("params", "bias") if m.use_bias else None
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
  dims, perm = qlayers.einsum_dimension_numbers(einsum_str, inputs.ndim, kernel.ndim)
  y = jnp.transpose(qdot.quant_dot_general(
      inputs, kernel, dims, spec, w_step=step, precision=m.precision,
      preferred_element_type=m.preferred_element_type, backend=backend), perm)
  if bias is not None:
    _, shape = m._get_bias_shape(einsum_str.replace(" ", ""), inputs, kernel)  # pylint: disable=protected-access
    y = y + jnp.reshape(bias, shape)
  return y


def _already_quantized(m: nn.Module) -> bool:
  return isinstance(getattr(m, "dot_general", None), _QuantDotFn) or isinstance(
      getattr(m, "conv_general_dilated", None), _QuantDotFn)


def _quant_rule(recipe: Recipe, m: nn.Module, method: str) -> Any:
  """The rule quantizing this call of ``m`` (a supported layer's ``__call__`` / ``attend``, not
  already re-issued quantized), or None."""
  if type(m) not in _SUPPORTED or method not in ("__call__", "attend") or _already_quantized(m):
    return None
  rule = recipe.match("/".join(m.path))
  return None if rule is None or rule.skip or rule.quant is None else rule


def _intercept(recipe: Recipe, backend: str, next_fun, args, kwargs, context):
  """Re-issues a matched layer call quantized; passes everything else through."""
  m = context.module
  rule = _quant_rule(recipe, m, context.method_name)
  if rule is None:
    return next_fun(*args, **kwargs)
  if not m.scope.has_variable("params", _kernel_name(m)):
    # Initialisation: the layer creates its params, then its LSQ step is made from the kernel.
    # (The output of `init` is the float layer's; every apply is quantized.)
    out = next_fun(*args, **kwargs)
    kernel = m.scope.get_variable("params", _kernel_name(m))
    _step(m, rule.quant, _contracting(m, kernel, _einsum_str(m, args, kwargs)))
    return out
  return _quantized_call(m, context.method_name, rule.quant, args, kwargs, backend)


class QuantizedLinen(nn.Module):
  """Runs ``inner`` with the layers that ``recipe`` matches quantized; same variable layout.

  Attributes:
    inner: the original Linen module.
    recipe: the rules (regex on the Linen module path, e.g. ``Dense_0`` or ``block/attn/query``).
    backend: where quantized products run ("xla", "tpu", "gpu"; `jaxcomp.quantize` resolves it).

  Example::

    qmodel, qvars = jc.quantize(model, recipe, variables=variables, args=(x,))
    qmodel.apply(qvars, x)
  """

  inner: nn.Module
  recipe: Recipe
  backend: str = "xla"

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args, **kwargs):
    # A plain function, not a method: Linen would intercept a method of its own.
    with nn.intercept_methods(functools.partial(_intercept, self.recipe, self.backend)):
      return self.inner(*args, **kwargs)


def _record(seen: dict[str, str]):
  """Interceptor that records the path and type of every layer that owns params."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    params = m.scope.variables().get("params", {}) if m.scope is not None else {}
    if m.path and any(not isinstance(v, dict) and hasattr(v, "shape")
                      for v in params.values()):
      seen.setdefault("/".join(m.path), type(m).__name__)
    return out

  return interceptor


def report_linen(module: nn.Module, recipe: Recipe, variables: Any, args: tuple,
                 kwargs: dict) -> MatchReport:
  """Which Linen layers the recipe matches (traced abstractly on the example arguments)."""
  seen: dict[str, str] = {}

  def run(variables, *args):
    with nn.intercept_methods(_record(seen)):
      return module.apply(variables, *args, **kwargs)

  jax.eval_shape(run, variables, *args)
  matched = {r.label: [] for r in recipe.rules}
  unsupported = []
  supported_names = {t.__name__ for t in _SUPPORTED}
  for path, kind in seen.items():
    rule = recipe.match(path)
    if rule is None:
      continue
    if rule.skip or kind in supported_names:
      matched[rule.label].append(path)
    else:
      unsupported.append((path, kind))
  unused = [label for label, paths in matched.items() if not paths]
  return MatchReport(matched=matched, unused=unused, unsupported=unsupported)


def quantize_linen(module: nn.Module, recipe: Recipe, *, variables: Any, args: tuple,
                   kwargs: dict | None, strict: bool, backend: str | None = None
                   ) -> tuple[nn.Module, Any, MatchReport]:
  """``(QuantizedLinen(module), new variables, report)``; ``variables`` is not modified."""
  kwargs = kwargs or {}
  report = report_linen(module, recipe, variables, args, kwargs)
  if strict:
    report.check()
  wrapped = QuantizedLinen(inner=module, recipe=recipe, backend=qdot.kernel_backend(backend))
  # Adding the LSQ steps: one forward with params mutable creates them from the kernels.
  apply = functools.partial(wrapped.apply, mutable=["params"], rngs={"params": jax.random.key(0)})
  _, updates = jax.jit(lambda v, *a: apply(v, *a, **kwargs))(variables, *args)
  new_vars = {**jax.tree.map(lambda x: x, dict(variables)), **updates}
  return wrapped, new_vars, report


def _record_quantized(recipe: Recipe, found: dict[tuple[str, ...], tuple[str, tuple, Quant]]):
  """Interceptor recording each layer that ``recipe`` quantizes: kernel name, axes, spec."""

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    rule = _quant_rule(recipe, m, context.method_name)
    if rule is not None and m.scope.has_variable("params", _kernel_name(m)):
      kernel = m.scope.get_variable("params", _kernel_name(m))
      if isinstance(m, nn.DenseGeneral) and m.batch_dims not in ((), None):
        raise ValueError(f"{'/'.join(m.path)}: convert does not pack DenseGeneral kernels "
                         "with batch_dims")
      if not isinstance(kernel, PackedParam):
        found.setdefault(tuple(m.path), (
            _kernel_name(m), _contracting(m, kernel, _einsum_str(m, args, kwargs)), rule.quant))
    return next_fun(*args, **kwargs)

  return interceptor


def quantized_layers_linen(module: nn.Module, variables: Any, args: tuple,
                           kwargs: dict | None) -> dict[tuple[str, ...], tuple[str, tuple, Quant]]:
  """``{layer path: (kernel name, contracting axes, spec)}`` of a `QuantizedLinen`'s quantized,
  not yet packed layers (traced abstractly on the example arguments)."""
  if not isinstance(module, QuantizedLinen):
    raise TypeError("convert: a Linen module must be the QuantizedLinen that jc.quantize "
                    f"returned, got {type(module).__name__}")
  kwargs = kwargs or {}
  found: dict[tuple[str, ...], tuple[str, tuple, Quant]] = {}

  def run(variables, *args):
    with nn.intercept_methods(_record_quantized(module.recipe, found)):
      return module.apply(variables, *args, **kwargs)

  jax.eval_shape(run, variables, *args)
  return found
