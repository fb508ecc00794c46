"""Entry points of the rewrite engine, dispatching on the kind of model (NNX or Linen)."""

from __future__ import annotations

from typing import Any

from absl import logging
from flax import linen as nn
from flax import nnx

from jaxcomp.recipe import MatchReport, Recipe
from jaxcomp.rewrite import engine, linen_quant
from jaxcomp.rewrite.nnx_quant import QUANT_HANDLERS, set_backend


def _check_recipe(recipe: Any) -> None:
  if not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a jaxcomp.Recipe, got {type(recipe).__name__}")


def quantize(
    model: nnx.Module | nn.Module,
    recipe: Recipe,
    *,
    variables: Any = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    strict: bool = False,
    backend: str | None = None,
) -> Any:
  """Returns a quantized copy of ``model``; ``model`` (and ``variables``) are left untouched.

  Each layer whose path matches a rule with ``quant=`` gets that `Quant` spec: Linear/Dense,
  LinearGeneral/DenseGeneral, Einsum and Conv quantize their kernel (and activations when
  ``a_bits`` is set, as a real int8 dot where both are symmetric); Embed quantizes its table
  (weight-only). Parameter names, shapes and logical sharding metadata are kept; LSQ steps
  (``learn_scale=True``) are added as `QuantScale` params.

  Args:
    model: an NNX module, or a Linen module (then ``variables`` and ``args`` are needed).
    recipe: a `jaxcomp.Recipe`.
    variables: Linen only: the module's variables (``{"params": ...}``).
    args, kwargs: Linen only: example call arguments (arrays or `jax.ShapeDtypeStruct`), used to
      trace the module once, abstractly, to find its layers.
    strict: raise if a rule matches no layer or matches a layer type that cannot be quantized.
    backend: where the quantized layers' integer products run: "xla", or "tpu" / "gpu" for the
      Pallas kernels; None: ``$JAXCOMP_KERNEL_BACKEND``, else the default device. Resolved
      here, once (`jaxcomp.quant.dot.kernel_backend`).

  Returns:
    NNX: the new model. Linen: ``(new_module, new_variables)``.

  Raises:
    ValueError: a matched layer's weight holds a NaN or inf (one line naming the layer, the
      first bad index and, for a stacked layer, its layer of the stack; checked once, on
      concrete weights only, so ``jax.eval_shape`` / ``nnx.eval_shape`` of this call still
      traces).

  Example:
    >>> recipe = jc.Recipe([jc.Rule(r".*", quant=jc.Quant(w_bits=8, a_bits=8))])
    >>> qmodel = jc.quantize(nnx_model, recipe)
    >>> qmodule, qvars = jc.quantize(linen_module, recipe, variables=variables, args=(x,))
  """
  _check_recipe(recipe)
  for rule in recipe.rules:
    if rule.quant is not None and rule.quant.method != "rtn":
      raise ValueError(f"Rule {rule.label!r}: Quant.method={rule.quant.method!r} solves weights "
                       "from calibration data; use jc.ptq(model, recipe, calib=...)")
  if isinstance(model, nnx.Module):
    if variables is not None or args:
      raise TypeError("quantize: variables= and args= are for Linen modules, not NNX models")
    new, rep = engine.rewrite(model, recipe, handlers=QUANT_HANDLERS,
                              kind=lambda r: r.quant, strict=strict, transform="jc.quantize")
    set_backend(new, backend)
    logging.info("jaxcomp.quantize:\n%s", rep)
    return new
  if isinstance(model, nn.Module):
    if variables is None or not args:
      raise TypeError("quantize: a Linen module needs variables= and args=(example inputs,)")
    module, new_vars, rep = linen_quant.quantize_linen(
        model, recipe, variables=variables, args=tuple(args), kwargs=kwargs, strict=strict,
        backend=backend)
    logging.info("jaxcomp.quantize:\n%s", rep)
    return module, new_vars
  raise TypeError(f"quantize: expected a flax.nnx or flax.linen Module, got {type(model).__name__}")


def report(
    model: nnx.Module | nn.Module,
    recipe: Recipe,
    *,
    variables: Any = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> MatchReport:
  """Which layers each rule of ``recipe`` would quantize, and which rules match nothing.

  Example:
    >>> print(jc.report(model, recipe))
    rule                                     layers
    .*attn/.*                                8
  """
  _check_recipe(recipe)
  if isinstance(model, nnx.Module):
    return engine.plan(model, recipe, QUANT_HANDLERS, lambda r: r.quant)[1]
  if variables is None or not args:
    raise TypeError("report: a Linen module needs variables= and args=(example inputs,)")
  return linen_quant.report_linen(model, recipe, variables, tuple(args), kwargs or {})
