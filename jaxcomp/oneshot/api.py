"""`ptq`, `prune`, `factorize`: one-shot transforms of NNX models over the shared sequential
pipeline (`jaxcomp.oneshot.pipeline`), each layer solved by the registered solver its spec
names (`jaxcomp.oneshot.registry`). Pure: the input model is left untouched.

* `ptq`: ``Quant.method`` -- rtn (data-free: the layer is quantized as `jaxcomp.quantize`
  would), gptq, awq, smoothquant. The result holds each solved layer's grid-aligned kernel, its
  step (a `QuantScale`) and, for AWQ/SmoothQuant, its input smoothing (a `SmoothScale`);
  `jaxcomp.convert` packs it.
* `prune`: ``Sparsity.method`` -- magnitude, wanda, sparsegpt; pruned weights exactly zero,
  same structure.
* `factorize`: ``LowRank.method`` -- svd, asvd, svd_llm; each matched ``nnx.Linear`` becomes a
  `LowRankLinear` at the same path.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.layers import quant as qlayers
from jaxcomp.layers.lowrank import LowRankLinear
from jaxcomp.oneshot import linen as linen_oneshot
from jaxcomp.oneshot import registry
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.pipeline import (LayerResult, kernel_2d, kernel_2d_shape, plan_transform,
                                      solve_all)
from jaxcomp.oneshot.solver import relative_error
from jaxcomp.quant.qarray import from_canonical, to_step_layout
from jaxcomp.quant.spec import Quant
from jaxcomp.recipe import Recipe
from jaxcomp.quant import dot as qdot
from jaxcomp.rewrite import engine
from jaxcomp.rewrite.linen_lowrank import LowRankLinen
from jaxcomp.rewrite.linen_quant import QuantizedLinen
from jaxcomp.rewrite.nnx_quant import QUANT_HANDLERS

Array = jax.Array
def _default_call(m: nnx.Module, b: Any) -> Any:
  return m(*b) if isinstance(b, tuple) else m(b)


def _set_kernel(m: nnx.Module, w2: Array) -> None:
  """Writes a (K, N) kernel ((L, K, N) for a stack) back into the layer's layout and dtype."""
  axes = engine.kernel_axes(m)
  var = getattr(m, axes.name)
  old = var[...]
  shape = old.shape[axes.stack:]
  put = engine.over_stack(lambda w: from_canonical(w.T, shape, axes.contracting), axes.stack)
  var[...] = put(w2).astype(old.dtype)


def _run(kind: str, model: nnx.Module, recipe: Recipe, calib: Any, payload: Callable[[Any], Any],
         solve: Callable[[nnx.Module, str, nnx.Module, Any, LayerStats | None], LayerResult],
         check: Callable[[str, nnx.Module, Any], None], *, name: str, batch_size: int,
         blocks: str | None, call: Callable | None, strict: bool, progress: bool,
         calib_dtype: Any) -> tuple[nnx.Module, list[LayerResult]]:
  """Plans ``model`` against the recipe's ``payload`` rules, checks each layer against its
  solver, and solves every layer in the sequential pipeline; returns the new model and one
  `LayerResult` per layer, in solve order."""
  for rule in recipe.rules if isinstance(recipe, Recipe) else ():
    if payload(rule) is not None:
      registry.get(kind, payload(rule).method)  # an unknown method fails before anything runs
  supported_types = {t for s in registry.SOLVERS if s.kind == kind for t in s.layers}
  new, calibrated, plain = plan_transform(
      name, model, recipe, calib, lambda m: type(m) in supported_types, payload,
      lambda spec: registry.get(kind, spec.method).calibrated, strict)
  for path, m, spec in calibrated + plain:
    solver = registry.get(kind, spec.method)
    if type(m) not in solver.layers:
      what = "calibrated methods" if solver.calibrated else f"method {spec.method!r}"
      types = " and ".join(f"nnx.{t.__name__}" for t in solver.layers)
      fix = ", use 'rtn'" if kind == "quant" else ""
      raise ValueError(f"{path}: {what} support {types} layers, not {type(m).__name__}; "
                       f"{registry.FIELDS[kind]}={spec.method!r} cannot solve it{fix}")
    axes = engine.kernel_axes(m)
    if solver.solve is not None and axes.batch:  # RTN quantizes as QAT does
      raise ValueError(f"{path}: {name} does not solve kernels with batch axes")
    if solver.calibrated and getattr(m, "feature_group_count", 1) != 1:
      raise ValueError(f"{path}: calibrated methods do not solve grouped convolutions "
                       f"(feature_group_count={m.feature_group_count})")
    check(path, m, spec)
  engine.check_finite_weights(calibrated + plain, f"jc.{name}")
  results: list[LayerResult] = []
  def one(p, m, spec, stats, root=new):  # root: one layer of a stack, p relative to it
    results.append(solve(root, p, m, spec, stats))
    return results[-1]

  solve_plain = lambda layers: [one(p, m, spec, None) for p, m, spec in layers]
  solve_all(new, calibrated, one, plain, solve_plain, calib, name=name, batch_size=batch_size,
            blocks=blocks, call=call or _default_call, progress=progress,
            calib_dtype=calib_dtype)
  return new, results


def _linen(kind: str, name: str, model: nn.Module, recipe: Recipe, calib: Any,
           payload: Callable[[Any], Any], wrap: Callable[[nn.Module], nn.Module],
           return_report: bool, kw: dict[str, Any]) -> tuple[Any, ...]:
  """A one-shot transform of a Linen module (`jaxcomp.oneshot.linen`):
  ``(wrap(model), new variables)``, plus the results with ``return_report``."""
  new_vars, results = linen_oneshot.run_linen(kind, name, model, recipe, calib,
                                              payload=payload, **kw)
  out = (wrap(model), new_vars)
  return out + (results,) if return_report else out


def _nnx_only(name: str, variables: Any, args: tuple) -> None:
  if variables is not None or args:
    raise TypeError(f"{name}: variables= and args= are for Linen modules, not NNX models")


def _timed(path: str, method: str, fn: Callable[[], tuple[float, int | None]]) -> LayerResult:
  t0 = time.perf_counter()
  err, rank = fn()
  return LayerResult(path, method, err, time.perf_counter() - t0, rank)


# --------------------------------------------------------------------------- ptq


def _install_quant(m: nnx.Module, spec: Quant, step2: Array | None,
                   in_scale: Array | None, zero2: Array | None = None) -> None:
  """Quantizes layer ``m`` with ``spec`` and installs a solved step (G, N), zero points and
  smoothing."""
  QUANT_HANDLERS[type(m)](m, dataclasses.replace(spec, learn_scale=False))
  axes = engine.kernel_axes(m)
  kernel = getattr(m, axes.name)
  hook = m.conv_general_dilated if isinstance(m, nnx.Conv) else m.dot_general
  hook.spec = spec
  if step2 is not None:
    step = to_step_layout(step2.T, kernel[...].shape, axes.contracting, spec)
    hook.w_step = qlayers.step_variable(kernel, axes.contracting, step)
  if zero2 is not None:
    zero = to_step_layout(zero2.T, kernel[...].shape, axes.contracting, spec)
    hook.w_zero = qlayers.QuantZero(jnp.asarray(zero, jnp.float32))
  if in_scale is not None:
    hook.in_scale = qlayers.SmoothScale(jnp.asarray(in_scale, jnp.float32))


def _solve_quant(root: nnx.Module, path: str, m: nnx.Module, spec: Quant, stats: LayerStats | None) -> LayerResult:
  del root
  solver = registry.get("quant", spec.method)

  def run():
    if solver.solve is None:  # data-free: quantized as QAT would
      QUANT_HANDLERS[type(m)](m, spec)
      return float("nan"), None
    w = kernel_2d(m)
    sol = solver.solve(w, stats, spec)
    _set_kernel(m, sol.kernel)
    _install_quant(m, spec, sol.step, sol.in_scale, sol.zero)
    return relative_error(w, sol.effective, stats.h), None

  return _timed(path, spec.method, run)


def ptq(model: nnx.Module | nn.Module, recipe: Recipe, calib: Any = None, *, batch_size: int = 8,
        blocks: str | None = None, call: Callable[..., Any] | None = None,
        strict: bool = False, progress: bool = True, calib_dtype: Any = jnp.bfloat16,
        return_report: bool = False, variables: Any = None, args: tuple[Any, ...] = ()) -> Any:
  """Post-training quantization of an NNX model or a Linen module; ``model`` (and Linen
  ``variables``) are left untouched.

  Args:
    model: an NNX model (e.g. `jaxcomp.models.Llama`), or a Linen module (then ``variables``
      is needed; `jaxcomp.oneshot.linen` says how Linen layers are calibrated).
    recipe: rules with `Quant` specs; ``Quant.method`` names the solver per layer.
    calib: calibration inputs: an array whose leading axis indexes examples (e.g. int32
      tokens [N, T], cut into ``batch_size`` batches), or an iterable of batches; may be None
      when every rule is data-free (rtn).
    batch_size: examples per forward pass when ``calib`` is an array.
    blocks: regex of the block paths to run sequentially; default: the elements of the
      outermost module list holding matched layers (``layers/0``, ``layers/1``, ...); Linen:
      the modules named ``<name>_<n>`` (``layers_0``). A stacked layer (``nnx.vmap`` /
      ``nn.scan``) is always solved one layer of the stack at a time.
    call: ``call(model, batch)`` runs the model; default ``model(batch)``. Linen:
      ``call(module, variables, batch)``, default ``module.apply(variables, batch)``.
    strict: raise if a rule matches nothing or matches an unsupported layer.
    progress: show a tqdm bar over blocks.
    calib_dtype: dtype of the weight-only matmuls while calibration data flows through the
      blocks (float32 accumulation; GPTQ's reference runs them in float16); None keeps the
      model's. W8A8 layers always run their int8 dot. The solved weights are float32.
    return_report: also return one `LayerResult` per solved layer.
    variables: Linen only: the module's variables (``module.init``'s dict, boxes kept).
    args: Linen only: example inputs to trace the module on when ``calib`` is None.

  Returns:
    The quantized model (convert it with `jaxcomp.convert` for serving), or
    ``(model, results)`` with ``return_report``. Linen: ``(QuantizedLinen, variables)``, the
    solved layers holding ``w_step`` (and ``w_zero`` / ``in_scale``) beside their kernels,
    plus the results with ``return_report``.

  Raises:
    ValueError: a matched layer's weight holds a NaN or inf (checked once, before anything is
      solved), or a layer's calibration statistics do (checked when collected); one line
      naming the layer, the array and the first bad index.

  Example::

    recipe = jc.Recipe([jc.Rule(r"layers/.*", quant=jc.Quant(w_bits=4, group=128,
                                                            method="gptq"))])
    qmodel, layers = jc.ptq(model, recipe, calib=tokens, return_report=True)
    qmodule, qvars = jc.ptq(linen_lm, recipe, calib=tokens, variables=variables)   # Linen
  """
  for rule in recipe.rules:
    if rule.quant is not None and rule.quant.scaling == "delayed":
      raise ValueError(f"ptq: rule {rule.label!r} has Quant(scaling='delayed'), whose scales "
                       "come from training steps; post-training quantization takes "
                       "scaling='dynamic'")
  if isinstance(model, nn.Module):
    return _linen("quant", "ptq", model, recipe, calib, lambda r: r.quant,
                  lambda m: QuantizedLinen(inner=m, recipe=recipe,
                                           backend=qdot.kernel_backend(None)), return_report,
                  dict(variables=variables, args=tuple(args), batch_size=batch_size,
                       blocks=blocks, call=call, strict=strict, progress=progress,
                       calib_dtype=calib_dtype))
  _nnx_only("ptq", variables, args)

  def check(path, m, spec):
    if registry.get("quant", spec.method).solve is not None:
      kernel_2d_shape(m)  # the (K, N) view exists

  new, results = _run("quant", model, recipe, calib, lambda r: r.quant, _solve_quant, check,
                      name="ptq", batch_size=batch_size, blocks=blocks, call=call,
                      strict=strict, progress=progress, calib_dtype=calib_dtype)
  return (new, results) if return_report else new


def ptq_skeleton(model: nnx.Module, recipe: Recipe) -> nnx.Module:
  """The structure `ptq` gives for ``model`` and ``recipe`` (any method), with placeholder
  values: what a saved PTQ result restores into. Nothing is calibrated or solved; which
  variables a solver installs (a solved step, zero points, an input smoothing) is read off the
  solver run once on a tiny random problem. Run it under `nnx.eval_shape` to allocate nothing.
  Stacked layers are not supported (a one-line error).

  Example::

    like = nnx.eval_shape(lambda m: jc.oneshot.ptq_skeleton(m, recipe), model)
    nnx.graphdef(like) == nnx.graphdef(jc.ptq(model, recipe, calib))      # True
  """
  supported = {t for s in registry.SOLVERS if s.kind == "quant" for t in s.layers}
  new, _, layers = plan_transform("ptq_skeleton", model, recipe, None,
                                  lambda m: type(m) in supported, lambda r: r.quant,
                                  lambda spec: False, False)
  for path, m, spec in layers:
    solver = registry.get("quant", spec.method)
    if solver.solve is None:
      QUANT_HANDLERS[type(m)](m, spec)
      continue
    if engine.kernel_axes(m).stack:
      raise ValueError(f"ptq_skeleton: {path} is a stacked layer; its solved structure is "
                       "built by the stack walk, not here")
    k, n = kernel_2d_shape(m)
    probe = _probe_solution(solver.name, spec)
    groups = 1 if probe.step is None or probe.step.shape[0] == 1 else -(-k // spec.group)
    cols = n if probe.step is None or probe.step.shape[1] != 1 else 1
    _install_quant(m, spec, None if probe.step is None else jnp.ones((groups, cols)),
                   None if probe.in_scale is None else jnp.ones((k,)),
                   None if probe.zero is None else jnp.zeros((groups, cols)))
  return new


@functools.lru_cache(maxsize=None)
def _probe_solution(method: str, spec: Quant) -> Any:
  """The solver's solution on a tiny random (K, 4) problem: which fields it fills."""
  k = 2 * (spec.group or 8)
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    return _probe(method, spec, k, rng)


def _probe(method: str, spec: Quant, k: int, rng: np.random.Generator) -> Any:
  x = rng.normal(size=(64, k)).astype(np.float32)
  stats = LayerStats(h=jnp.asarray(2 * x.T @ x / len(x)), absmax=jnp.asarray(np.abs(x).max(0)),
                     mean_abs=jnp.asarray(np.abs(x).mean(0)), count=len(x))
  w = jnp.asarray(rng.normal(size=(k, 4)).astype(np.float32))
  return registry.get("quant", method).solve(w, stats, spec)


# --------------------------------------------------------------------------- prune


def _check_nm(path: str, m: nnx.Module, spec: Any) -> None:
  k = kernel_2d_shape(m)[-2]
  if spec.nm is not None and k % spec.nm[1]:
    raise ValueError(f"{path}: Sparsity.pattern {spec.pattern!r} needs the input size {k} "
                     f"to be a multiple of M={spec.nm[1]}")


def _solve_sparse(root: nnx.Module, path: str, m: nnx.Module, spec: Any,
                  stats: LayerStats | None) -> LayerResult:
  del root

  def run():
    w = kernel_2d(m)
    solve = registry.get("sparsity", spec.method).solve
    stack = engine.kernel_axes(m).stack  # a stack is pruned layer by layer (data-free only)
    w_hat = engine.over_stack(lambda w: solve(w, stats, spec), stack, sequential=True)(w)
    _set_kernel(m, w_hat)
    return (float("nan") if stats is None else relative_error(w, w_hat, stats.h)), None

  return _timed(path, spec.method, run)


def prune(model: nnx.Module | nn.Module, recipe: Recipe, calib: Any = None, *,
          batch_size: int = 8, blocks: str | None = None, call: Callable[..., Any] | None = None,
          strict: bool = False, progress: bool = True, calib_dtype: Any = jnp.bfloat16,
          return_report: bool = False, variables: Any = None, args: tuple[Any, ...] = ()) -> Any:
  """One-shot pruning of an NNX model or a Linen module by the recipe's `Sparsity` rules;
  ``model`` (and Linen ``variables``) are untouched.

  Args:
    model: an NNX model (Linear, LinearGeneral and Conv kernels are pruned; wanda and
      sparsegpt need Linear / LinearGeneral / Conv, whose inputs they record), or a Linen
      module (Dense, DenseGeneral, Conv) with its ``variables``.
    recipe: rules with ``sparsity=jc.Sparsity(...)`` (their ``quant`` is ignored here).
    calib: calibration inputs (as for `jaxcomp.ptq`); required when a rule uses wanda or
      sparsegpt.
    batch_size, blocks, call, strict, progress, calib_dtype, variables, args: as for
      `jaxcomp.ptq`.
    return_report: also return one `LayerResult` per pruned layer (``error``: relative output
      error on the calibration inputs; NaN for magnitude).

  Returns:
    The pruned model (same structure, pruned weights exactly zero), or ``(model, results)``.
    Linen: ``(module, pruned variables)`` (+ results).

  Raises:
    ValueError: non-finite weights or calibration statistics, as for `jaxcomp.ptq`.

  Example::

    recipe = jc.Recipe([jc.Rule(r".*_proj", sparsity=jc.Sparsity("2:4", method="sparsegpt"))])
    pruned = jc.prune(model, recipe, calib=tokens)     # tokens: int32[128, 512]
  """
  if isinstance(model, nn.Module):
    return _linen("sparsity", "prune", model, recipe, calib, lambda r: r.sparsity,
                  lambda m: m, return_report,
                  dict(variables=variables, args=tuple(args), batch_size=batch_size,
                       blocks=blocks, call=call, strict=strict, progress=progress,
                       calib_dtype=calib_dtype))
  _nnx_only("prune", variables, args)
  new, results = _run("sparsity", model, recipe, calib, lambda r: r.sparsity, _solve_sparse,
                      _check_nm, name="prune", batch_size=batch_size, blocks=blocks, call=call,
                      strict=strict, progress=progress, calib_dtype=calib_dtype)
  return (new, results) if return_report else new


# --------------------------------------------------------------------------- factorize


def factorize(model: nnx.Module | nn.Module, recipe: Recipe, calib: Any = None, *,
              batch_size: int = 8, blocks: str | None = None,
              call: Callable[..., Any] | None = None, strict: bool = False,
              progress: bool = True, calib_dtype: Any = jnp.bfloat16,
              return_report: bool = False, variables: Any = None,
              args: tuple[Any, ...] = ()) -> Any:
  """Factors the linear layers the recipe's `LowRank` rules match; ``model`` (and Linen
  ``variables``) are untouched.

  Args:
    model: an NNX model (``nnx.Linear`` layers are factored), or a Linen module (``nn.Dense``
      layers) with its ``variables``.
    recipe: rules with ``lowrank=jc.LowRank(...)`` (their ``quant`` / ``sparsity`` are ignored
      here).
    calib: calibration inputs (as for `jaxcomp.ptq`); required for asvd and svd_llm.
    batch_size, blocks, call, strict, progress, calib_dtype, variables, args: as for
      `jaxcomp.ptq`.
    return_report: also return one `LayerResult` per factored layer (with its rank).

  Returns:
    The factored model, or ``(model, results)``. Linen: ``(LowRankLinen(module), variables)``
    with ``lowrank_a`` (K, r) / ``lowrank_b`` (r, N) in place of each factored kernel
    (+ results).

  Raises:
    ValueError: non-finite weights or calibration statistics, as for `jaxcomp.ptq`.

  Example::

    recipe = jc.Recipe([jc.Rule(r".*_proj", lowrank=jc.LowRank(reduction=0.4, method="svd_llm"))])
    small = jc.factorize(model, recipe, calib=tokens)
  """
  if isinstance(model, nn.Module):
    return _linen("lowrank", "factorize", model, recipe, calib, lambda r: r.lowrank,
                  lambda m: LowRankLinen(inner=m), return_report,
                  dict(variables=variables, args=tuple(args), batch_size=batch_size,
                       blocks=blocks, call=call, strict=strict, progress=progress,
                       calib_dtype=calib_dtype))
  _nnx_only("factorize", variables, args)

  def check(path, m, spec):
    if spec.rank is not None and spec.rank > min(m.kernel[...].shape[-2:]):
      raise ValueError(f"{path}: LowRank.rank={spec.rank} is above min(in, out) = "
                       f"min{tuple(m.kernel[...].shape[-2:])}")

  def solve(root, path, m, spec, stats):
    def run():
      w = m.kernel[...]
      factor = lambda w: registry.get("lowrank", spec.method).solve(w, stats, spec)
      if w.ndim == 2:
        a, b = factor(w)
      else:  # a data-free method on a stack (nnx.vmap): each layer factored, ranks must agree
        factors = [factor(wi) for wi in w]
        ranks = sorted({fa.shape[-1] for fa, _ in factors})
        if len(ranks) > 1:
          raise ValueError(f"{path}: the stacked layers got different ranks {ranks}; give "
                           "LowRank.rank or reduction= (one rank for the stack)")
        a, b = jnp.stack([fa for fa, _ in factors]), jnp.stack([fb for _, fb in factors])
      engine.set_at(root, path, LowRankLinear.from_linear(m, a, b))
      err = float("nan") if stats is None else relative_error(w, a @ b, stats.h)
      return err, a.shape[-1]

    return _timed(path, spec.method, run)

  new, results = _run("lowrank", model, recipe, calib, lambda r: r.lowrank, solve, check,
                      name="factorize", batch_size=batch_size, blocks=blocks, call=call,
                      strict=strict, progress=progress, calib_dtype=calib_dtype)
  return (new, results) if return_report else new
