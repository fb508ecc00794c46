"""`ptq(model, recipe, calib)`: post-training quantization of an NNX model, block by block.

The recipe's `Quant` specs pick each layer's solver with ``method``:

* ``"rtn"`` -- round to nearest; needs no data (the layer is quantized as `jaxcomp.quantize`
  would, scales calibrated from the weights).
* ``"gptq"`` -- `jaxcomp.ptq.gptq_core.gptq` on the layer's input Hessian.
* ``"awq"`` -- `jaxcomp.ptq.awq_core.awq`: per-input-feature scales ``s`` searched on the exact
  output error; the layer computes ``(x / s) @ Q(diag(s) W)``.
* ``"smoothquant"`` -- `jaxcomp.ptq.smoothquant_core`: ``s`` migrates activation outliers into
  the weights; then W8A8 with per-token activations.

Calibrated layers are solved sequentially: the first block's inputs are recorded, and each
block in turn is run with `Capture` hooks on its layers, its layers are solved, and the
*quantized* block is run again to give the next block its inputs. Layers outside the blocks
(e.g. an untied ``lm_head``) are solved last from one pass over the whole quantized model.

The result is a quantized model of the same kind `jaxcomp.quantize` makes: each solved layer
holds its grid-aligned kernel, its step (a `QuantScale`) and, for AWQ/SmoothQuant, its input
smoothing (a `SmoothScale`); `jaxcomp.convert` packs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.layers import quant as qlayers
from jaxcomp.ptq import awq_core, gptq_core, smoothquant_core
from jaxcomp.ptq.calibrate import (Capture, LayerStats, _module_at, catch_inputs, find_blocks,
                                   low_precision_dot)
from jaxcomp.quant import dot as qdot
from jaxcomp.quant.spec import CALIBRATED_METHODS, Quant
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import nnx_rewrite

Array = jax.Array


@dataclasses.dataclass
class LayerResult:
  """What PTQ (or pruning, or factorization) did to one layer.

  Attributes:
    path: module path.
    method: the solver.
    error: relative output error ``||X (W_q - W)||^2 / ||X W||^2`` on the calibration inputs
      (from the Hessian; NaN for layers solved without data, e.g. RTN).
    seconds: wall time of the solve.
    rank: the rank chosen (`jaxcomp.factorize` only).
  """

  path: str
  method: str
  error: float
  seconds: float
  rank: int | None = None


def _relative_error(w: Array, w_eff: Array, h: Array) -> float:
  d = (w_eff - w).astype(jnp.float32)
  num = jnp.sum(d * (h @ d))
  den = jnp.sum(w.astype(jnp.float32) * (h @ w.astype(jnp.float32)))
  return float(num / jnp.maximum(den, 1e-30))


def solve_layer(w: Array, stats: LayerStats, spec: Quant) -> tuple[Array, Array | None, Array | None, float]:
  """Solves one (K, N) kernel from its input statistics.

  Args:
    w: kernel (K, N).
    stats: the layer's `LayerStats`.
    spec: the layer's `Quant` (``method`` in gptq / awq / smoothquant).

  Returns:
    ``(kernel, step, in_scale, error)``: the new kernel (on its grid for gptq/awq, smoothed
    float for smoothquant), its step (kernel layout, None for smoothquant: calibrated at run
    time), the input smoothing (K,) or None, and the relative output error.

  Example::

    kernel, step, s, err = solve_layer(w, stats, jc.Quant(w_bits=4, method="gptq"))
  """
  h = stats.h
  if spec.method == "gptq":
    res = gptq_core.gptq(w, h, spec, damp=spec.damp, act_order=spec.act_order)
    return res.w_hat, res.step, None, _relative_error(w, res.w_hat, h)
  if spec.method == "awq":
    w_hat_scaled, s = awq_core.awq(w, h, stats.mean_abs, spec)
    step = gptq_core.weight_step(s[:, None] * w.astype(jnp.float32), spec)
    return w_hat_scaled, step, s, _relative_error(w, w_hat_scaled / s[:, None], h)
  if spec.method == "smoothquant":
    s = smoothquant_core.smooth_scales(stats.absmax, w, spec.smooth_alpha)
    ws = smoothquant_core.smooth(w, s)
    w_eff = gptq_core.rtn(ws, spec) / s[:, None]  # weights only; activations are dynamic
    return ws, None, s, _relative_error(w, w_eff, h)
  raise ValueError(f"solve_layer: method {spec.method!r} needs no calibration")


def _kernel_2d(m: nnx.Module, path: str) -> Array:
  """The (K, N) kernel of a layer a calibrated method can solve, or a one-line error."""
  if type(m) is nnx.Linear:
    return m.kernel[...]
  if type(m) is nnx.LinearGeneral and not m.batch_axis:
    w = m.kernel[...]
    k = int(np.prod(w.shape[:len(m.axis)]))
    return w.reshape(k, -1)
  raise ValueError(f"{path}: calibrated methods support nnx.Linear and nnx.LinearGeneral "
                   f"layers, not {type(m).__name__}")


def _as_batches(calib: Any, batch_size: int, fn: str = "ptq") -> list[Any]:
  if calib is None:
    raise ValueError(f"{fn}: calib is missing; the recipe has calibrated methods")
  if isinstance(calib, (np.ndarray, jax.Array)):
    if calib.ndim < 1 or calib.shape[0] == 0:
      raise ValueError(f"{fn}: calib must hold at least one example, got shape {calib.shape}")
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]
  batches = list(calib)
  if not batches:
    raise ValueError(f"{fn}: calib is empty")
  return batches


@nnx.jit
def _run_block(block: nnx.Module, args: tuple, kwargs: dict) -> Any:
  return block(*args, **kwargs)


class _CalibQuantDot(nnx.Module):
  """Stands in for a weight-only `QuantDot` while calibration data flows through a solved
  block: the same fake-quantized kernel and input smoothing, the dot in ``dtype``."""

  def __init__(self, hook: qlayers.QuantDot, dtype: Any):
    self.hook = hook
    self.dtype = dtype

  def __call__(self, lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None) -> Array:
    hook = self.hook
    (lc, rc), _ = dimension_numbers
    if hook.in_scale is not None:
      lhs = qlayers.divide_contracting(lhs, hook.in_scale[...], lc)
    step = None if hook.w_step is None else hook.w_step[...]
    w_hat = qdot.fake_quant_weight(rhs, rc, hook.spec, step)
    return low_precision_dot(lhs, w_hat, dimension_numbers, self.dtype,
                             preferred_element_type=preferred_element_type)


def _capture_and_solve(todo: list[tuple[str, nnx.Module, Any]], run: Callable[[], None],
                       solve: Callable[[str, nnx.Module, Any, LayerStats], None],
                       dtype: Any = None) -> None:
  """Installs `Capture` hooks on ``todo``'s layers, calls ``run()``, then ``solve``s each one
  (with its plain ``dot_general`` back in place) from its input statistics."""
  captures, originals = {}, {}
  for path, m, _ in todo:
    w = _kernel_2d(m, path)
    captures[path], originals[path] = Capture(w.shape[0], dtype), m.dot_general
    m.dot_general = nnx.data(captures[path])
  run()
  for path, m, payload in todo:
    stats = captures.pop(path).stats()
    m.dot_general = nnx.static(originals[path])  # the plain layer again, before the rewrite
    solve(path, m, payload, stats)


def _solve_quant(results: list[LayerResult]) -> Callable[[str, nnx.Module, Quant, LayerStats],
                                                          None]:
  def solve(path: str, m: nnx.Module, spec: Quant, stats: LayerStats) -> None:
    t0 = time.perf_counter()
    w = _kernel_2d(m, path)
    kernel, step, s, err = solve_layer(w, stats, spec)
    _apply(m, spec, kernel.reshape(m.kernel[...].shape).astype(m.kernel[...].dtype), step, s)
    results.append(LayerResult(path, spec.method, err, time.perf_counter() - t0))

  return solve


def _apply(m: nnx.Module, spec: Quant, kernel: Array, step: Array | None,
           in_scale: Array | None) -> None:
  """Quantizes layer ``m`` with ``spec`` and installs the solved kernel, step and smoothing."""
  nnx_rewrite.QUANT_HANDLERS[type(m)](m, dataclasses.replace(spec, learn_scale=False))
  m.kernel[...] = kernel
  contracting = tuple(range(m.kernel[...].ndim - 1)) if type(m) is nnx.Linear else tuple(
      range(len(m.axis)))
  hook = m.dot_general
  hook.spec = spec
  if step is not None:
    step = step.reshape(qlayers.qdot.weight_scale_shape(kernel.shape, contracting, spec))
    hook.w_step = qlayers.step_variable(m.kernel, contracting, step)
  if in_scale is not None:
    hook.in_scale = qlayers.SmoothScale(jnp.asarray(in_scale, jnp.float32))


@contextlib.contextmanager
def _calibration_dots(block: nnx.Module, dtype: Any):
  """Runs the weight-only quantized layers of ``block`` in ``dtype`` for the duration."""
  swapped = []
  if dtype is not None:
    for _, node in nnx.iter_graph(block):
      hook = getattr(node, "dot_general", None)
      if isinstance(hook, qlayers.QuantDot) and hook.spec.a_bits is None:
        node.dot_general = nnx.data(_CalibQuantDot(hook, dtype))
        swapped.append((node, hook))
  try:
    yield
  finally:
    for node, hook in swapped:
      node.dot_general = hook


def ptq(model: nnx.Module, recipe: Recipe, calib: Any, *, batch_size: int = 8,
        blocks: str | None = None, call: Callable[[nnx.Module, Any], Any] | None = None,
        strict: bool = False, progress: bool = True, calib_dtype: Any = jnp.bfloat16,
        results: list[LayerResult] | None = None) -> nnx.Module:
  """Post-training quantization of an NNX model; ``model`` is left untouched.

  Args:
    model: an NNX model (e.g. `jaxcomp.models.Llama`).
    recipe: rules with `Quant` specs; ``Quant.method`` picks the solver per layer.
    calib: calibration inputs: an array whose leading axis indexes examples (e.g. int32
      tokens [N, T], cut into ``batch_size`` batches), or an iterable of batches.
    batch_size: examples per forward pass when ``calib`` is an array.
    blocks: regex of the block paths to run sequentially; default: the elements of the
      outermost module list holding matched layers (``layers/0``, ``layers/1``, ...).
    call: ``call(model, batch)`` runs the model; default ``model(batch)``.
    strict: raise if a rule matches nothing or matches an unsupported layer.
    progress: show a tqdm bar over blocks.
    calib_dtype: dtype of the weight-only matmuls while calibration data flows through the
      blocks (float32 accumulation; GPTQ's reference runs them in float16); None keeps the
      model's. W8A8 layers always run their int8 dot. The solved weights are float32.
    results: if a list is given, one `LayerResult` per solved layer is appended to it.

  Returns:
    The quantized model (convert it with `jaxcomp.convert` for serving).

  Example::

    recipe = jc.Recipe([jc.Rule(r"layers/.*", quant=jc.Quant(w_bits=4, group=128,
                                                            method="gptq"))])
    qmodel = jc.ptq(model, recipe, calib=tokens)      # tokens: int32[128, 512]
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"ptq: expected a flax.nnx Module, got {type(model).__name__}")
  if not isinstance(recipe, Recipe):
    raise TypeError(f"ptq: recipe must be a jaxcomp.Recipe, got {type(recipe).__name__}")
  call = call or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
  results = [] if results is None else results
  new = nnx.clone(model)
  todo, report = nnx_rewrite.plan(new, recipe, nnx_rewrite.QUANT_HANDLERS, lambda r: r.quant)
  if strict:
    report.check()
  logging.info("jaxcomp.ptq:\n%s", report)
  calibrated = [(p, m, r.quant) for p, m, r in todo if r.quant.method in CALIBRATED_METHODS]
  for path, m, spec in calibrated:
    try:
      _kernel_2d(m, path)  # fail early on an unsupported layer
    except ValueError as e:
      raise ValueError(f"{e}; Quant.method={spec.method!r} cannot solve it, use 'rtn'") from None
  rtn = [(p, m, r.quant) for p, m, r in todo if r.quant.method not in CALIBRATED_METHODS]

  def quantize_rtn(layers):
    for path, m, spec in layers:
      nnx_rewrite.QUANT_HANDLERS[type(m)](m, spec)
      results.append(LayerResult(path, "rtn", float("nan"), 0.0))

  solve_all(new, calibrated, _solve_quant(results), rtn, quantize_rtn, calib, name="ptq",
            batch_size=batch_size, blocks=blocks, call=call, progress=progress,
            calib_dtype=calib_dtype)
  return new


def plan_transform(name: str, model: nnx.Module, recipe: Recipe, calib: Any,
                   handlers: dict[type, Any], payload: Callable[[Any], Any],
                   calibrated_methods: tuple[str, ...], strict: bool
                   ) -> tuple[nnx.Module, list[tuple[str, nnx.Module, Any]],
                              list[tuple[str, nnx.Module, Any]]]:
  """The common start of `jaxcomp.prune` / `jaxcomp.factorize`: checks the arguments, clones
  ``model``, matches the recipe's ``payload`` rules and splits the layers into calibrated and
  data-free ``(path, layer, spec)`` lists; a missing ``calib`` is a one-line error naming the
  first rule that needs it."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{name}: expected a flax.nnx Module, got {type(model).__name__}")
  if not isinstance(recipe, Recipe):
    raise TypeError(f"{name}: recipe must be a jaxcomp.Recipe, got {type(recipe).__name__}")
  new = nnx.clone(model)
  todo, report = nnx_rewrite.plan(new, recipe, handlers, payload)
  if strict:
    report.check()
  logging.info("jaxcomp.%s:\n%s", name, report)
  needs_data = lambda rule: payload(rule).method in calibrated_methods
  calibrated = [(p, m, payload(r)) for p, m, r in todo if needs_data(r)]
  plain = [(p, m, payload(r)) for p, m, r in todo if not needs_data(r)]
  if calibrated and calib is None:
    rule = next(r for _, _, r in todo if needs_data(r))
    raise ValueError(f"{name}: calib is missing; rule {rule.label!r} has "
                     f"{type(payload(rule)).__name__}.method={payload(rule).method!r}, which "
                     "needs calibration inputs")
  return new, calibrated, plain


def solve_all(model: nnx.Module, calibrated: list[tuple[str, nnx.Module, Any]],
              solve: Callable[[str, nnx.Module, Any, LayerStats], None],
              plain: list[tuple[str, nnx.Module, Any]],
              solve_plain: Callable[[list[tuple[str, nnx.Module, Any]]], None], calib: Any, *,
              name: str, batch_size: int, blocks: str | None,
              call: Callable[[nnx.Module, Any], Any], progress: bool, calib_dtype: Any) -> None:
  """Solves ``calibrated`` layers in the sequential pipeline and ``plain`` (data-free) ones in
  the same block order (each block's before its capture); without calibrated layers, just the
  plain ones."""
  if not calibrated:
    solve_plain(plain)
    return
  run_sequential(
      model, calibrated, solve, _as_batches(calib, batch_size, name), blocks=blocks, call=call,
      progress=progress, calib_dtype=calib_dtype, desc=f"{name} blocks",
      before_block=lambda b: solve_plain([t for t in plain if _inside(t[0], b)]),
      before_tail=lambda in_blocks: solve_plain([t for t in plain if not in_blocks(t[0])]))


def _inside(path: str, block: str) -> bool:
  return path.startswith(block + "/")


def run_sequential(model: nnx.Module, todo: list[tuple[str, nnx.Module, Any]],
                   solve: Callable[[str, nnx.Module, Any, LayerStats], None],
                   batches: list[Any], *, blocks: str | None = None,
                   call: Callable[[nnx.Module, Any], Any], progress: bool = True,
                   calib_dtype: Any = None, desc: str = "blocks",
                   before_block: Callable[[str], None] | None = None,
                   before_tail: Callable[[Callable[[str], bool]], None] | None = None,
                   ) -> Callable[[str], bool]:
  """The sequential calibration pipeline shared by `ptq` and `jaxcomp.prune` (in place).

  Records the first block's inputs, then for each block: ``before_block(path)``, `Capture`
  hooks on the block's ``todo`` layers while it runs on the recorded inputs, ``solve(path,
  layer, payload, stats)`` for each of them, and the *rewritten* block run again to give the
  next block its inputs. ``todo`` layers outside every block are solved last from one pass
  over the whole model (after ``before_tail(in_blocks)``).

  Returns:
    ``in_blocks(path)``: whether a layer path lies inside one of the blocks.
  """
  block_paths = find_blocks(model, [p for p, _, _ in todo], blocks)
  if blocks is not None and not block_paths:
    raise ValueError(f"blocks={blocks!r} matches no module of the model")
  in_blocks = lambda path: any(_inside(path, b) for b in block_paths)
  if block_paths:
    inputs = catch_inputs(model, block_paths[0], batches, call)
    for b in tqdm(block_paths, desc=desc, disable=not progress):
      block = _module_at(model, b)
      if before_block is not None:
        before_block(b)

      def run_capture(block=block, inputs=inputs):
        for args, kwargs in inputs:
          _run_block(block, args, kwargs)

      _capture_and_solve([t for t in todo if _inside(t[0], b)], run_capture, solve, calib_dtype)
      if b == block_paths[-1] and all(in_blocks(t[0]) for t in todo):
        break  # nothing after the last block needs its outputs
      with _calibration_dots(block, calib_dtype):
        inputs = [((_run_block(block, args, kwargs),) + tuple(args[1:]), kwargs)
                  for args, kwargs in inputs]
    del inputs
  if before_tail is not None:
    before_tail(in_blocks)
  tail = [t for t in todo if not in_blocks(t[0])]
  if tail:
    run_model = nnx.jit(lambda m, b: call(m, b))

    def run_capture():
      for batch in batches:
        run_model(model, batch)

    _capture_and_solve(tail, run_capture, solve)
  return in_blocks
