"""`convert`: a quantized (QAT or PTQ) NNX model, or a quantized Linen module's variables -> the
packed serving form.

Each quantized layer's float kernel is replaced by a `QArray` (int8, or int4 two per byte, with
its scales), computed from the kernel and the layer's step (learned by LSQ or solved by PTQ) or,
without a step, by the same calibration the fake-quant forward uses. The layer keeps its
quantized-dot hook, which now receives the `QArray` and runs the serving path of
`jaxcomp.quant.dot.quant_dot_general`; its outputs equal the fake-quant model's. For Linen, the
`QuantizedLinen` from `jaxcomp.quantize` stays as it is and its variables are packed: the wrapper
runs the packed path for every `QArray` kernel it meets.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax import nnx
from flax.core import meta
from flax.core import spmd as core_spmd
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant.finite import check_finite
from jaxcomp.quant.qarray import QArray, leaf_partition_specs, quantize_weight, quantize_with_step
from jaxcomp.quant.spec import Quant
from jaxcomp.rewrite import engine
from jaxcomp.rewrite.linen_quant import (PackedParam, QuantizedLayer, box_value,
                                         check_finite_linen, quantized_layers_linen, stack_axis)
from jaxcomp.quant.dot import kernel_backend
from jaxcomp.rewrite.nnx_quant import quant_layers, set_backend


def pack_kernel(kernel: Any, contracting: tuple[int, ...], spec: Quant,
                step: Any = None, zero: Any = None) -> QArray:
  """The `QArray` of one kernel: on ``step`` (and ``zero``, an asymmetric solved grid) when
  given (LSQ / PTQ), else calibrated by ``spec``.

  Example:
    >>> pack_kernel(jnp.ones((8, 4)), (0,), jc.Quant(w_bits=4)).values.shape
    (4, 4)
  """
  if step is not None:
    return quantize_with_step(kernel, contracting, step, spec.w_bits, spec.group,
                              zero_point=zero, full_range=spec.full_range, fmt=spec.w_format,
                              scale_dtype=spec.scale_dtype)
  return quantize_weight(kernel, contracting, spec)


# One program per kernel shape and spec: packing compiles once where its eager form compiles
# each of its ops per shape (the integer codes and scales are the same either way).
_pack_kernel_jit = jax.jit(pack_kernel, static_argnums=(1, 2))


def convert(model: nnx.Module | nn.Module, *, variables: Any = None, args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None, backend: str | None = None) -> Any:
  """Returns the packed serving form of a quantized model; ``model`` is left untouched.

  Every layer quantized by `jaxcomp.quantize` (QAT) or `jaxcomp.ptq` gets its kernel replaced by a
  `QArray` parameter (int8 values for 5-8 bits, int4 packed two per byte for 2-4 bits, float32
  scales per channel or group). Its forward pass runs the integer path of the quantized dot:
  int8 x int8 -> int32 for W8A8 layers, dequantize-and-dot for weight-only ones, with logits
  equal to the fake-quant model's. Save it with `jaxcomp.save_packed`.

  Args:
    model: an NNX model with quantized layers, or the `QuantizedLinen` module that
      `jaxcomp.quantize` returned for a Linen model (then ``variables`` and ``args`` are needed).
    variables: Linen only: the quantized module's variables (``w_step`` params included).
    args, kwargs: Linen only: example call arguments (arrays or `jax.ShapeDtypeStruct`), used to
      trace the module once, abstractly, to find its quantized layers.
    backend: where the packed dots run ("xla", or "tpu" / "gpu" for the Pallas kernels); None
      keeps each layer's backend as `jaxcomp.quantize` resolved it.

  Raises:
    ValueError: a quantized layer's kernel, step, zero points or input smoothing holds a NaN
      or inf (one line naming the layer and the first bad index; concrete values only).

  Returns:
    NNX: the new model. Linen: ``(module, packed_variables)``, where each kernel is a
    `PackedParam` box holding its `QArray` and the ``w_step`` params are gone; ``module.apply(packed_variables, x)`` runs the
    packed path.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
    >>> qmodel = jc.quantize(model, jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4))]))
    >>> packed = jc.convert(qmodel)
    >>> type(packed.layers[0].kernel[...]).__name__
    'QArray'
    >>> x = jnp.ones((2, 64))
    >>> bool((packed(x) == qmodel(x)).all())
    True
    >>> dense = nn.Dense(32)                                      # Linen
    >>> variables = dense.init(jax.random.key(0), x)
    >>> recipe = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4))])
    >>> qdense, qvars = jc.quantize(dense, recipe, variables=variables, args=(x,))
    >>> qdense, packed_vars = jc.convert(qdense, variables=qvars, args=(x,))
    >>> type(packed_vars["params"]["kernel"]).__name__
    'PackedParam'
    >>> bool((qdense.apply(packed_vars, x) == qdense.apply(qvars, x)).all())
    True
  """
  if isinstance(model, nn.Module):
    if variables is None or not args:
      raise TypeError("convert: a Linen module needs variables= and args=(example inputs,)")
    module, packed = _convert_linen(model, variables, tuple(args), kwargs)
    if backend is not None:
      module = module.clone(backend=kernel_backend(backend))
    return module, packed
  if not isinstance(model, nnx.Module):
    raise TypeError(f"convert: expected a flax.nnx or flax.linen Module, got "
                    f"{type(model).__name__}")
  if variables is not None or args:
    raise TypeError("convert: variables= and args= are for Linen modules, not NNX models")
  new = nnx.clone(model)
  if backend is not None:
    set_backend(new, backend)
  layers = list(quant_layers(new))
  if not layers:
    raise ValueError("convert: the model has no quantized layers; run jc.quantize or jc.ptq first")
  check_finite(_convert_inputs(layers), refuses="jc.convert refuses non-finite weights")
  _check_calibrated(layers)
  for layer in layers:
    var = getattr(layer.module, layer.kernel_name)
    value = var[...]
    if isinstance(value, QArray):
      continue  # already packed
    if layer.batch:
      raise ValueError(f"{layer.path}: convert does not pack LinearGeneral kernels with batch axes")
    step, zero = layer.hook.w_step, getattr(layer.hook, "w_zero", None)
    pack = engine.over_stack(  # a stacked layer packs per layer: values and scales keep the stack axes
        lambda w, s, z, c=layer.contracting, q=layer.spec: _pack_kernel_jit(w, c, q, s, z),
        layer.stack,
        sequential=True)  # one layer's intermediates at a time
    qa = pack(value, None if step is None else step[...], None if zero is None else zero[...])
    setattr(layer.module, layer.kernel_name, _packed_variable(var, qa, layer.stack))
    layer.hook.w_step = None
    if zero is not None:
      layer.hook.w_zero = None
    if not isinstance(layer.module, qlayers.QuantEmbed):
      layer.module.promote_dtype = qlayers.promote_keep_packed
  return new


def _check_calibrated(layers: list[Any]) -> None:
  """Delayed-scaling layers serve on their activation history's scale: one never filled
  (`jaxcomp.calibrate_amax`, or training) would serve NaN, so it is refused by name."""
  for layer in layers:
    var = getattr(layer.hook, "amax_history", None)
    if (var is None or isinstance(var[...], jax.core.Tracer)
        or not isinstance(var[...], (jax.Array, np.ndarray))):
      continue  # no delayed scaling, or traced / abstract (nnx.eval_shape of a skeleton)
    activations = np.asarray(var[...])[..., 0, :]  # (stack..., steps)
    if not activations.any(axis=-1).all():
      raise ValueError(f"convert: {layer.path}: its amax history is empty (Quant(scaling="
                       "'delayed') layers need jc.calibrate_amax or training first)")


def _convert_inputs(layers: list[Any]) -> list[tuple[str, Any, tuple[int, ...]]]:
  """``(label, array, stack axes)`` of what `convert` packs or keeps of each quantized NNX
  layer: the float kernel (not yet packed), its step, zero points and input smoothing."""
  items = []
  for layer in layers:
    stack = tuple(range(layer.stack))
    items.append((f"{layer.path}: {layer.kernel_name}",
                  getattr(layer.module, layer.kernel_name)[...], stack))
    for name in ("w_step", "w_zero", "in_scale"):
      var = getattr(layer.hook, name, None)
      if var is not None:
        items.append((f"{layer.path}: {name}", var[...], stack))
  return items


def _packed_variable(var: nnx.Variable, qa: QArray, stack: int) -> nnx.Param:
  """The packed kernel's variable: the kernel's logical names kept as ``kernel_sharding``
  metadata and, when the kernel was placed on a mesh, each leaf placed by them (values
  ``(N, K)``: the first output and contracting axes' mesh axes; scales: the output's).

  ``out_sharding`` is not set: Flax applies it to a variable's value as one spec of the
  value's rank, which a `QArray`'s leaves do not share; `leaf_partition_specs` gives theirs.
  """
  names = var.get_metadata().get("out_sharding")
  if names is None:
    return nnx.Param(qa)
  sharding = getattr(var[...], "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and stack <= 1:
    mesh_axes = tuple(nnx.spmd.get_var_pspec(var))  # the logical rules in force applied
    mesh_axes += (None,) * (len(names) - len(mesh_axes))
    specs = leaf_partition_specs(qa, mesh_axes, 0 if stack else None)
    qa = jax.tree.map(lambda x, p: jax.device_put(x, jax.sharding.NamedSharding(
        sharding.mesh, p)), qa, specs)
  return nnx.Param(qa, kernel_sharding=tuple(names))


def packed_named_sharding(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """``nnx.get_named_sharding`` for the state of a converted NNX model: each packed kernel gets
  one `NamedSharding` per `QArray` leaf from its ``kernel_sharding`` names (values ``(N, K)``:
  the first output and contracting names; scales: the output's; the logical axis rules in
  force applied), every other variable its usual one.

  Example::

    graphdef, state = nnx.split(jc.convert(qmodel))
    with nnx.logical_axis_rules(rules):
      state = jax.device_put(state, packed_named_sharding(state, mesh))
  """
  rules = core_spmd.get_logical_axis_rules()

  def one(v):
    if not isinstance(v, nnx.Variable):
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    value = v.get_value()
    if not isinstance(value, QArray):
      return v.replace(jax.sharding.NamedSharding(mesh, nnx.spmd.get_var_pspec(v)))
    names = v.get_metadata().get("kernel_sharding")
    if names is not None and rules:
      names = tuple(core_spmd.from_sharding_rules(names, rules))
    stack = value.values.ndim - 2
    specs = leaf_partition_specs(value, names, 0 if stack == 1 else None) if stack <= 1 else (
        jax.tree.map(lambda _: jax.sharding.PartitionSpec(), value))
    return v.replace(jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _pack_linen(path: str, stored: Any, step: Any, layer: QuantizedLayer,
                zero: Any = None) -> PackedParam:
  """One Linen kernel packed into its `PackedParam` (on its solved or learned step and zero
  points when given); a kernel stacked by ``nn.scan`` / ``nn.vmap`` is packed per layer, with
  the stack axis kept at its place in every leaf."""
  axis = stack_axis(path, stored, layer.shape, layer.names)
  kernel = box_value(stored)
  step, zero = (None if x is None else box_value(x) for x in (step, zero))
  pack = lambda w, s, z: _pack_kernel_jit(w, layer.contracting, layer.spec, s, z)
  if axis is None:
    qa = pack(kernel, step, zero)
  else:
    front = lambda x: None if x is None else jnp.moveaxis(x, axis, 0)
    qa = engine.over_stack(pack, 1, sequential=True)(front(kernel), front(step), front(zero))
    qa = jax.tree.map(lambda x: jnp.moveaxis(x, 0, axis), qa)
  names = stored.names if isinstance(stored, meta.Partitioned) else None
  return PackedParam(qa, names=names, stack_axis=axis, mesh=getattr(stored, "mesh", None),
                     rules=getattr(stored, "rules", None))


def _convert_linen(module: nn.Module, variables: Any, args: tuple,
                   kwargs: dict | None) -> tuple[nn.Module, Any]:
  is_packed = lambda x: isinstance(x, PackedParam)
  found = quantized_layers_linen(module, variables, args, kwargs)
  if not found and not any(map(is_packed, jax.tree.leaves(variables, is_leaf=is_packed))):
    raise ValueError("convert: the module has no quantized layers; check the recipe")
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  check_finite_linen(variables, [("/".join(p), name, layer.shape if name == layer.kernel else None)
                                 for p, layer in found.items()
                                 for name in (layer.kernel, "w_step", "w_zero", "in_scale")],
                     "jc.convert")
  new_vars = jax.tree.map(lambda x: x, dict(variables), is_leaf=is_box)  # fresh dicts
  for path, layer in found.items():
    params = new_vars["params"]
    for key in path:
      params = params[key]
    step, zero = params.pop("w_step", None), params.pop("w_zero", None)
    params[layer.kernel] = _pack_linen("/".join(path), params[layer.kernel], step, layer, zero)
  return module, new_vars
