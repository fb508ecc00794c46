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
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax.core import meta

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant import dot as qdot
from jaxcomp.quant.finite import check_finite
from jaxcomp.quant.qarray import QArray, initial_step, leaf_partition_specs
from jaxcomp.quant.spec import Quant
from jaxcomp.recipe import MatchReport, Recipe
from jaxcomp.rewrite.engine import kernel_axes

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed)


class _QuantDotFn:
  """A ``dot_general`` bound to a spec and a step (marks a clone as already quantized); a PTQ
  solved layer also has its zero points and its input smoothing (``lhs / in_scale``)."""

  def __init__(self, spec: Quant, w_step: jax.Array | None, backend: str,
               w_zero: jax.Array | None = None, in_scale: jax.Array | None = None):
    self.spec, self.w_step, self.backend = spec, w_step, backend
    self.w_zero, self.in_scale = w_zero, in_scale

  def smooth(self, lhs, dimension_numbers):
    if self.in_scale is None:
      return lhs
    return qlayers.divide_contracting(lhs, self.in_scale, dimension_numbers[0][0])

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               **unused):
    return qdot.quant_dot_general(self.smooth(lhs, dimension_numbers), rhs, dimension_numbers,
                                  self.spec, w_step=self.w_step, w_zero=self.w_zero,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type,
                                  backend=self.backend)


class _QuantConvFn(_QuantDotFn):

  def __call__(self, lhs, rhs, *args, **kwargs):
    kwargs.pop("out_sharding", None)
    return qdot.quant_conv_general_dilated(lhs, rhs, *args, spec=self.spec, w_step=self.w_step,
                                           w_zero=self.w_zero, **kwargs)


class PackedParam(nn.LogicallyPartitioned):
  """A packed kernel in a Linen ``params`` tree (what `jaxcomp.convert` puts there).

  Linen layers read their kernel with ``self.param``, which unboxes it and checks its shape;
  unboxing gives the dequantized kernel in its logical shape (``nn.unbox`` of packed variables
  yields float weights equal to the fake-quant ones). The quantized layer call never uses that
  value (dead code under ``jit``): its injection point contracts with ``value``, the `QArray`.

  The box keeps the kernel's logical axis names (``names``, in the stored layout, or None when
  the kernel was not partitioned) and, for a kernel stacked by ``nn.scan`` / ``nn.vmap``, the
  stacked axis (``stack_axis``): every leaf of the `QArray` carries the layer axis at that
  position, so the lifted transform slices one layer's `QArray` out of it like any variable.
  `nn.get_partition_spec` gives one logical spec per leaf: values and zero points ``(N, K)``
  take the names of the kernel's first output and first contracting axis, scales ``(N, G)``
  the output name only.

  Example:
    >>> from jaxcomp.quant.qarray import quantize_weight
    >>> box = PackedParam(quantize_weight(jnp.ones((8, 4)), (0,), jc.Quant(w_bits=4)),
    ...                   names=("embed", "mlp"))
    >>> box.unbox().shape
    (8, 4)
    >>> nn.get_partition_spec({"kernel": box})["kernel"].value.scale
    P('mlp', None)
  """

  stack_axis: int | None = struct.field(pytree_node=False, default=None)

  def unbox(self, apply_constraint: bool = True) -> jax.Array:
    del apply_constraint
    if self.stack_axis is None:
      return self.value.dequantize()
    return jax.vmap(QArray.dequantize, in_axes=self.stack_axis,
                    out_axes=self.stack_axis)(self.value)

  def replace_boxed(self, val: Any) -> PackedParam:
    return self.replace(value=val)

  def add_axis(self, index: int, params: dict[Any, Any]) -> PackedParam:
    if self.stack_axis is not None:
      raise ValueError("packed kernels are stacked over one nn.scan / nn.vmap axis, not two")
    names = self.names
    if names is not None:
      names = names[:index] + (params.get(nn.PARTITION_NAME),) + names[index:]
    return self.replace(stack_axis=index, names=names)

  def remove_axis(self, index: int, params: dict[Any, Any]) -> PackedParam:
    del params
    names = None if self.names is None else self.names[:index] + self.names[index + 1:]
    return self.replace(stack_axis=None, names=names)

  def get_partition_spec(self) -> Any:
    """Logical specs shaped like the box: one `PartitionSpec` per leaf of the `QArray`."""
    return self.replace(value=leaf_partition_specs(self.value, self.names, self.stack_axis))

  def get_sharding(self, mesh: jax.sharding.Mesh) -> Any:
    specs = nn.logical_to_mesh(self.get_partition_spec(), self.rules)
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


class _PackedDotFn(_QuantDotFn):
  """A ``dot_general`` that contracts with a packed `QArray` instead of the kernel it is given
  (the layer's own call runs, with the unboxed stand-in as its kernel)."""

  def __init__(self, spec: Quant, packed: QArray, backend: str,
               in_scale: jax.Array | None = None):
    super().__init__(spec, None, backend, in_scale=in_scale)
    self.packed = packed

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               **unused):
    del rhs  # the stand-in
    return qdot.quant_dot_general(self.smooth(lhs, dimension_numbers), self.packed,
                                  dimension_numbers, self.spec, precision=precision,
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
    einsum_str = einsum_str_of(m, args, kwargs)
    bias = _param(m, "bias") if m.use_bias else None
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
    clone = m.clone(parent=m.scope, dot_general=_PackedDotFn(
        spec, packed, backend, _optional(m, "in_scale")), dot_general_cls=None)
  return getattr(clone, method)(*args, **kwargs)


def _contracting(m: nn.Module, kernel: jax.Array, einsum_str: str | None) -> tuple[int, ...]:
  return kernel_axes(m, kernel_ndim=kernel.ndim, einsum_str=einsum_str).contracting


def kernel_param_name(m: nn.Module) -> str:
  """The name of a Linen layer's weight param.

  Example:
    >>> kernel_param_name(nn.Embed(10, 4)), kernel_param_name(nn.Dense(4))
    ('embedding', 'kernel')
  """
  return "embedding" if isinstance(m, nn.Embed) else "kernel"


def boxed_param(m: nn.Module, name: str) -> Any:
  """A bound layer's param as its scope holds it: a `PackedParam`, a metadata box (e.g.
  ``nn.LogicallyPartitioned``) or an array (inside ``nn.scan``: one layer's).

  Example::

    kernel = boxed_param(module, "kernel")       # in an interceptor, module = context.module
  """
  return m.scope.get_variable("params", name)


def _param(m: nn.Module, name: str) -> Any:
  """A layer's param as an array (boxes such as ``nn.LogicallyPartitioned`` unboxed); a
  `PackedParam` stays boxed (its `QArray` is what the packed path contracts with)."""
  raw = boxed_param(m, name)
  return raw if isinstance(raw, PackedParam) else meta.unbox(raw)


def boxed_like(box: Any, value: jax.Array, contracting: tuple[int, ...]) -> Any:
  """``value`` (a step, zero point: the kernel's rank, contracting axes reduced) in the box
  type of its kernel ``box``, with the kernel's logical names on the output axes only; a plain
  array when the kernel is not boxed.

  Example:
    >>> kernel = nn.LogicallyPartitioned(jnp.ones((8, 4)), ("embed", "mlp"))
    >>> boxed_like(kernel, jnp.ones((1, 4)), (0,)).names
    (None, 'mlp')
  """
  if not isinstance(box, meta.Partitioned):
    return value
  names = tuple(None if a in contracting else n for a, n in enumerate(box.names))
  return box.replace(value=value, names=names)


def _optional(m: nn.Module, name: str) -> jax.Array | None:
  """A param the layer may have (a PTQ-solved ``w_zero`` / ``in_scale``), unboxed, or None."""
  return _param(m, name) if m.scope.has_variable("params", name) else None


def _step(m: nn.Module, spec: Quant, contracting: tuple[int, ...]) -> jax.Array | None:
  """The layer's step: solved by PTQ or learned (LSQ), read; for LSQ with params mutable,
  created from the kernel; None when the step is computed from the weights at run time."""
  if m.scope.has_variable("params", "w_step"):
    return _param(m, "w_step")
  if not spec.learn_scale:
    return None
  if m.scope.is_mutable_collection("params"):
    box = boxed_param(m, kernel_param_name(m))
    init = lambda *_: boxed_like(box, initial_step(meta.unbox(box), contracting, spec),
                                 contracting)
    return m.scope.param("w_step", init)
  raise ValueError(
      f"{'/'.join(m.path)}: no 'w_step' param; build the variables with "
      "jc.quantize(module, recipe, variables=..., args=...) or module.init")


def einsum_str_of(m: nn.Module, args: tuple, kwargs: dict) -> str | None:
  """A Linen Einsum's equation for this call (given at call time or as its attribute); None
  for other layers.

  Example:
    >>> einsum_str_of(nn.Einsum((4, 8), "bd,df->bf"), (jnp.ones((2, 4)),), {})
    'bd,df->bf'
  """
  if not isinstance(m, nn.Einsum):
    return None
  return kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or m.einsum_str


def _quantized_call(m: nn.Module, method: str, spec: Quant, args, kwargs, backend: str) -> Any:
  einsum_str = einsum_str_of(m, args, kwargs)
  kernel = _param(m, kernel_param_name(m))
  if isinstance(kernel, PackedParam):
    return _packed_call(m, method, spec, kernel.value, args, kwargs, backend)
  contracting = _contracting(m, kernel, einsum_str)
  step = _step(m, spec, contracting)
  if isinstance(m, (nn.Dense, nn.DenseGeneral)):
    clone = m.clone(parent=m.scope, dot_general=_QuantDotFn(
        spec, step, backend, _optional(m, "w_zero"), _optional(m, "in_scale")),
                    dot_general_cls=None)
    return getattr(clone, method)(*args, **kwargs)
  if isinstance(m, nn.Conv):
    clone = m.clone(parent=m.scope, conv_general_dilated=_QuantConvFn(
        spec, step, backend, _optional(m, "w_zero")), conv_general_dilated_cls=None)
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
  bias = _param(m, "bias") if m.use_bias else None
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
  if not m.scope.has_variable("params", kernel_param_name(m)):
    # Initialisation: the layer creates its params, then its LSQ step is made from the kernel.
    # (The output of `init` is the float layer's; every apply is quantized.)
    out = next_fun(*args, **kwargs)
    kernel = _param(m, kernel_param_name(m))
    _step(m, rule.quant, _contracting(m, kernel, einsum_str_of(m, args, kwargs)))
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


def box_value(x: Any) -> Any:
  """The array inside a metadata box (no sharding constraint applied), or ``x`` itself.

  Example:
    >>> box_value(nn.LogicallyPartitioned(jnp.ones(2), ("embed",))).shape
    (2,)
  """
  if isinstance(x, meta.Partitioned):
    return x.value
  return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def fresh_dicts(tree: Any) -> Any:
  """A copy of a variables tree with new dicts all the way down (leaves and boxes shared), so a
  transform can set params in it without touching the input.

  Example:
    >>> v = {"params": {"up": {"kernel": jnp.ones(2)}}}
    >>> fresh_dicts(v)["params"]["up"] is v["params"]["up"]
    False
  """
  if isinstance(tree, Mapping):
    return {k: fresh_dicts(v) for k, v in tree.items()}
  return tree


def stored_param(variables: Any, path: tuple[str, ...] | str, name: str) -> Any:
  """The param ``name`` of the layer at ``path`` as stored in a Linen variables tree (for a
  layer under ``nn.scan`` / ``nn.vmap``: the stacked value), or None.

  Example:
    >>> variables = {"params": {"up": {"kernel": jnp.ones((3, 4))}}}
    >>> stored_param(variables, "up", "kernel").shape
    (3, 4)
  """
  node = variables.get("params", {})
  for key in (path.split("/") if isinstance(path, str) else path):
    if key not in node:
      return None
    node = node[key]
  return node.get(name) if hasattr(node, "get") else None


def stack_axis(path: str, stored: Any, seen_shape: tuple[int, ...],
               seen_names: tuple[Any, ...] | None = None) -> int | None:
  """Which axis of a stored Linen param stacks the copies of a layer that its call saw with
  ``seen_shape`` (the axis ``nn.scan`` / ``nn.vmap`` lifted it over), or None when not stacked.

  Found from the shapes and, for boxed params, the logical names (the stored names are the
  seen ones with the stack axis' name inserted); when the shapes leave several axes possible
  and no names tell them apart, axis 0 (``variable_axes={"params": 0}``, the common layout).

  Example:
    >>> stack_axis("mlp/up", jnp.ones((16, 3, 32)), (16, 32))
    1
  """
  if isinstance(stored, PackedParam):
    return stored.stack_axis
  shape = tuple(box_value(stored).shape)
  extra = len(shape) - len(seen_shape)
  if extra == 0:
    return None
  if extra != 1:
    raise ValueError(f"{path}: stacked over {extra} axes (nested nn.scan / nn.vmap); jaxcomp "
                     "handles one stack axis per layer")
  candidates = [a for a in range(len(shape)) if shape[:a] + shape[a + 1:] == tuple(seen_shape)]
  names = getattr(stored, "names", None) if isinstance(stored, meta.Partitioned) else None
  if names is not None and seen_names is not None:
    candidates = [a for a in candidates if names[:a] + names[a + 1:] == tuple(seen_names)]
  if not candidates:
    raise ValueError(f"{path}: stored shape {shape} is not the called layer's {seen_shape} "
                     "with one stack axis")
  return 0 if 0 in candidates else candidates[0]


def _record(seen: dict[str, tuple[str, Any]]):
  """Interceptor recording the path, type and (for a supported layer) the kernel as the call
  sees it, of every layer that owns params."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    params = meta.unbox(m.scope.variables().get("params", {})) if m.scope is not None else {}
    if m.path and any(not isinstance(v, dict) and hasattr(v, "shape")
                      for v in params.values()):
      kernel = params.get(kernel_param_name(m)) if type(m) in _SUPPORTED else None
      seen.setdefault("/".join(m.path), (type(m).__name__, kernel))
    return out

  return interceptor


def report_linen(module: nn.Module, recipe: Recipe, variables: Any, args: tuple,
                 kwargs: dict, supported: tuple[type, ...] = _SUPPORTED) -> MatchReport:
  """Which Linen layers the recipe matches (traced abstractly on the example arguments); a
  layer stacked by ``nn.scan`` / ``nn.vmap`` is listed once, with its depth. ``supported``:
  the layer types the transform handles (others a rule matches are reported unsupported)."""
  return _report_and_layers(module, recipe, variables, args, kwargs, supported)[0]


def check_finite_linen(variables: Any, layers: list[tuple[str, str, Any]],
                       transform: str) -> None:
  """Refuses non-finite weights of Linen layers (`jaxcomp.quant.finite.check_finite`): a
  one-line `ValueError` naming the layer path, the param, the first bad index and, for a
  layer stacked by ``nn.scan`` / ``nn.vmap``, the layer of the stack. Abstract variables
  (`jax.ShapeDtypeStruct`) and tracers are not checked.

  Args:
    variables: the module's variables (``{"params": ...}``, boxes allowed).
    layers: ``(path, param name, shape one call sees)`` for each layer to check (the shape
      finds the stack axis; None: not stacked).
    transform: the public name in the message, e.g. ``"jc.quantize"``.

  Example:
    >>> v = {"params": {"up": {"kernel": jnp.ones((3, 2)).at[2, 1].set(jnp.inf)}}}
    >>> check_finite_linen(v, [("up", "kernel", (3, 2))], "jc.quantize")
    Traceback (most recent call last):
    ...
    ValueError: up: kernel has a non-finite value (inf) at index (2, 1); jc.quantize refuses non-finite weights
  """
  items = []
  for path, name, seen_shape in layers:
    stored = stored_param(variables, path, name)
    if stored is None or isinstance(stored, PackedParam):
      continue
    value = box_value(stored)
    axis = None
    if seen_shape is not None and hasattr(value, "shape"):
      axis = stack_axis(path, stored, tuple(seen_shape))
    items.append((f"{path}: {name}", value, () if axis is None else (axis,)))
  check_finite(items, refuses=f"{transform} refuses non-finite weights")


def _report_and_layers(module: nn.Module, recipe: Recipe, variables: Any, args: tuple,
                       kwargs: dict, supported: tuple[type, ...] = _SUPPORTED
                       ) -> tuple[MatchReport, list[tuple[str, str, Any]]]:
  """`report_linen`, and the ``(path, param, seen shape)`` of each supported layer a rule
  with a payload matches (for `check_finite_linen`)."""
  seen: dict[str, tuple[str, Any]] = {}

  def run(variables, *args):
    with nn.intercept_methods(_record(seen)):
      return module.apply(variables, *args, **kwargs)

  jax.eval_shape(run, variables, *args)
  matched = {r.label: [] for r in recipe.rules}
  unsupported, depth, layers = [], {}, []
  supported_names = {t.__name__ for t in supported}
  for path, (kind, kernel) in seen.items():
    rule = recipe.match(path)
    if rule is None:
      continue
    if rule.skip or kind in supported_names:
      matched[rule.label].append(path)
      if not rule.skip and kernel is not None:
        layers.append((path, "embedding" if kind == "Embed" else "kernel",
                       getattr(kernel, "shape", None)))
    else:
      unsupported.append((path, kind))
    if kernel is not None and not isinstance(kernel, PackedParam):
      stored = stored_param(variables, path, "embedding" if kind == "Embed" else "kernel")
      axis = None if stored is None else stack_axis(path, stored, kernel.shape)
      if axis is not None:
        depth[path] = box_value(stored).shape[axis]
  unused = [label for label, paths in matched.items() if not paths]
  return MatchReport(matched=matched, unused=unused, unsupported=unsupported,
                     depth=depth), layers


def quantize_linen(module: nn.Module, recipe: Recipe, *, variables: Any, args: tuple,
                   kwargs: dict | None, strict: bool, backend: str | None = None
                   ) -> tuple[nn.Module, Any, MatchReport]:
  """``(QuantizedLinen(module), new variables, report)``; ``variables`` is not modified."""
  kwargs = kwargs or {}
  for rule in recipe.rules:
    if rule.quant is not None and rule.quant.scaling == "delayed":
      raise ValueError(f"rule {rule.label!r}: Quant(scaling='delayed') is NNX-only for now "
                       "(its absmax histories are NNX variables); on Linen use "
                       "scaling='dynamic'")
  report, layers = _report_and_layers(module, recipe, variables, args, kwargs)
  if strict:
    report.check()
  quantized = {p for r in recipe.rules if r.quant is not None and not r.skip
               for p in report.matched.get(r.label, ())}
  check_finite_linen(variables, [t for t in layers if t[0] in quantized], "jc.quantize")
  wrapped = QuantizedLinen(inner=module, recipe=recipe, backend=qdot.kernel_backend(backend))
  # Adding the LSQ steps: one forward with params mutable creates them from the kernels. The
  # steps depend on the kernels only: abstract example inputs run as zeros, and abstract
  # variables give abstract steps.
  apply = functools.partial(wrapped.apply, mutable=["params"], rngs={"params": jax.random.key(0)})
  run = lambda v, *a: apply(v, *a, **kwargs)
  is_abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  if any(map(is_abstract, jax.tree.leaves(variables))):
    _, updates = jax.eval_shape(run, variables, *args)
  else:
    concrete = lambda x: jnp.zeros(x.shape, x.dtype) if is_abstract(x) else x
    _, updates = jax.jit(run)(variables, *jax.tree.map(concrete, args))
  new_vars = {**jax.tree.map(lambda x: x, dict(variables)), **updates}
  return wrapped, new_vars, report


class QuantizedLayer(NamedTuple):
  """A quantized (not yet packed) Linen layer as its call sees it (`quantized_layers_linen`).

  Attributes:
    kernel: the param name (``kernel`` / ``embedding``).
    contracting: the contracted axes of one layer's kernel.
    spec: its `Quant` spec.
    shape: one layer's kernel shape (under ``nn.scan`` the stored one has a stack axis more).
    names: one layer's logical axis names, or None when the kernel is not boxed.
  """

  kernel: str
  contracting: tuple[int, ...]
  spec: Quant
  shape: tuple[int, ...]
  names: tuple[Any, ...] | None


def _record_quantized(recipe: Recipe, found: dict[tuple[str, ...], QuantizedLayer]):
  """Interceptor recording each layer that ``recipe`` quantizes (a `QuantizedLayer`)."""

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    rule = _quant_rule(recipe, m, context.method_name)
    if rule is not None and m.scope.has_variable("params", kernel_param_name(m)):
      raw = boxed_param(m, kernel_param_name(m))
      if isinstance(m, nn.DenseGeneral) and m.batch_dims not in ((), None):
        raise ValueError(f"{'/'.join(m.path)}: convert does not pack DenseGeneral kernels "
                         "with batch_dims")
      if not isinstance(raw, PackedParam):
        kernel = meta.unbox(raw)
        found.setdefault(tuple(m.path), QuantizedLayer(
            kernel_param_name(m), _contracting(m, kernel, einsum_str_of(m, args, kwargs)), rule.quant,
            tuple(kernel.shape), getattr(raw, "names", None)))
    return next_fun(*args, **kwargs)

  return interceptor


def quantized_layers_linen(module: nn.Module, variables: Any, args: tuple,
                           kwargs: dict | None) -> dict[tuple[str, ...], QuantizedLayer]:
  """``{layer path: QuantizedLayer}`` of a `QuantizedLinen`'s quantized, not yet packed layers
  (traced abstractly on the example arguments)."""
  if not isinstance(module, QuantizedLinen):
    raise TypeError("convert: a Linen module must be the QuantizedLinen that jc.quantize "
                    f"returned, got {type(module).__name__}")
  kwargs = kwargs or {}
  found: dict[tuple[str, ...], QuantizedLayer] = {}

  def run(variables, *args):
    with nn.intercept_methods(_record_quantized(module.recipe, found)):
      return module.apply(variables, *args, **kwargs)

  jax.eval_shape(run, variables, *args)
  return found
