"""`prune(model, recipe, calib)`: one-shot pruning of an NNX model (magnitude, Wanda, SparseGPT).

The recipe's `Sparsity` specs say what each layer loses: ``pattern`` (unstructured, N:M along
the input axis, or whole blocks), ``sparsity`` and the scoring ``method``:

* ``"magnitude"`` -- ``|w|`` ranked over the layer (or per N:M group / per block); no data.
* ``"wanda"`` -- ``|w| * ||x||`` (`jaxcomp.sparse.wanda`), ranked per output for unstructured
  sparsity, with the input norms from the calibration pass (``||x_k|| ~ sqrt(H_kk)``).
* ``"sparsegpt"`` -- `jaxcomp.ptq.sparsegpt_core.sparsegpt`: OBS reconstruction on the layer's
  input Hessian; the kept weights change to absorb the pruned ones.

Calibrated layers go through the same sequential pipeline as `jaxcomp.ptq`: each block sees
the outputs of the already-pruned blocks before it. The result is a model of the same
structure whose pruned weights are exactly zero (a pure rewrite: ``model`` is untouched).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.ptq import sparsegpt_core
from jaxcomp.ptq.api import (LayerResult, _kernel_2d, _relative_error, plan_transform,
                             solve_all)
from jaxcomp.ptq.calibrate import LayerStats
from jaxcomp.recipe import Recipe
from jaxcomp.sparse import masks, scores
from jaxcomp.sparse.spec import CALIBRATED_SPARSITY_METHODS, Sparsity

Array = jax.Array

# Layers whose kernel can be pruned, viewed as (K, N): K the contracting (input) axes.
_PRUNABLE = {nnx.Linear: None, nnx.LinearGeneral: None, nnx.Conv: None}


def _kernel_view(m: nnx.Module, path: str) -> Array:
  """The layer's kernel as ``(K, N)`` (inputs x outputs)."""
  w = m.kernel[...]
  if type(m) is nnx.Conv:
    return w.reshape(-1, w.shape[-1])
  return _kernel_2d(m, path)


def prune_kernel(w: Array, spec: Sparsity, h: Array | None = None) -> Array:
  """Prunes one ``(K, N)`` kernel as ``spec`` says; ``h`` is its inputs' Hessian ``2 X^T X / n``
  (needed by wanda and sparsegpt).

  Returns:
    The pruned ``(K, N)`` kernel (zeros where pruned; for sparsegpt the kept weights updated).

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> wp = prune_kernel(w, jc.Sparsity("2:4"))
    >>> int((wp == 0).sum())
    16
  """
  if spec.method in CALIBRATED_SPARSITY_METHODS and h is None:
    raise ValueError(f"Sparsity.method={spec.method!r} needs the inputs' Hessian h")
  if spec.method == "sparsegpt":
    return sparsegpt_core.sparsegpt(w, h, sparsity=spec.sparsity, nm=spec.nm).w_hat
  if spec.method == "wanda":
    s = scores.wanda(w, jnp.sqrt(jnp.maximum(jnp.diag(h), 0.0)))
  else:
    s = scores.magnitude(w)
  if spec.nm is not None:
    mask = masks.nm_mask(s, *spec.nm, axis=0)
  elif spec.pattern == "block":
    mask = masks.block_mask(s, spec.sparsity, spec.block)
  else:  # Wanda ranks each output's inputs; magnitude the whole layer
    mask = masks.unstructured_mask(s, spec.sparsity, axis=0 if spec.method == "wanda" else None)
  return masks.apply_mask(w, mask)


def _solver(results: list[LayerResult]) -> Callable[[str, nnx.Module, Sparsity,
                                                     LayerStats | None], None]:
  def solve(path: str, m: nnx.Module, spec: Sparsity, stats: LayerStats | None) -> None:
    t0 = time.perf_counter()
    w = _kernel_view(m, path)
    h = None if stats is None else stats.h
    w_hat = prune_kernel(w, spec, h)
    m.kernel[...] = w_hat.reshape(m.kernel[...].shape).astype(m.kernel[...].dtype)
    err = float("nan") if h is None else _relative_error(w, w_hat, h)
    results.append(LayerResult(path, spec.method, err, time.perf_counter() - t0))

  return solve


def prune(model: nnx.Module, recipe: Recipe, calib: Any = None, *, batch_size: int = 8,
          blocks: str | None = None, call: Callable[[nnx.Module, Any], Any] | None = None,
          strict: bool = False, progress: bool = True, calib_dtype: Any = jnp.bfloat16,
          results: list[LayerResult] | None = None) -> nnx.Module:
  """One-shot pruning of an NNX model by the recipe's `Sparsity` rules; ``model`` is untouched.

  Args:
    model: an NNX model (Linear, LinearGeneral and Conv kernels are pruned; wanda and
      sparsegpt need Linear / LinearGeneral, whose inputs they record).
    recipe: rules with ``sparsity=jc.Sparsity(...)`` (their ``quant`` is ignored here).
    calib: calibration inputs (as for `jaxcomp.ptq`); required when a rule uses wanda or
      sparsegpt.
    batch_size, blocks, call, strict, progress, calib_dtype: as for `jaxcomp.ptq`.
    results: if a list is given, one `LayerResult` per pruned layer is appended (``error``:
      relative output error on the calibration inputs; NaN for magnitude).

  Returns:
    The pruned model: same structure, pruned weights exactly zero.

  Example::

    recipe = jc.Recipe([jc.Rule(r".*_proj", sparsity=jc.Sparsity("2:4", method="sparsegpt"))])
    pruned = jc.prune(model, recipe, calib=tokens)     # tokens: int32[128, 512]
  """
  call = call or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
  results = [] if results is None else results
  new, calibrated, plain = plan_transform("prune", model, recipe, calib, _PRUNABLE,
                                          lambda r: r.sparsity, CALIBRATED_SPARSITY_METHODS,
                                          strict)
  for path, m, spec in calibrated:
    try:
      _kernel_2d(m, path)
    except ValueError as e:
      raise ValueError(f"{e}; Sparsity.method={spec.method!r} cannot prune it") from None
  for path, m, spec in calibrated + plain:
    k = _kernel_view(m, path).shape[0]
    if spec.nm is not None and k % spec.nm[1]:
      raise ValueError(f"{path}: Sparsity.pattern {spec.pattern!r} needs the input size {k} "
                       f"to be a multiple of M={spec.nm[1]}")
  solve = _solver(results)
  prune_plain = lambda layers: [solve(p, m, spec, None) for p, m, spec in layers]
  solve_all(new, calibrated, solve, plain, prune_plain, calib, name="prune",
            batch_size=batch_size, blocks=blocks, call=call, progress=progress,
            calib_dtype=calib_dtype)
  return new

