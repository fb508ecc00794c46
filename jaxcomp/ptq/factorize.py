"""`factorize(model, recipe, calib)`: low-rank factorization of an NNX model's linear layers.

Each ``nnx.Linear`` matched by a rule with ``lowrank=jc.LowRank(...)`` becomes a
`jaxcomp.layers.lowrank.LowRankLinear` (``(x @ a) @ b + bias``) at the same path, its rank from
the spec (fixed, a parameter budget, or an energy threshold) and its factors from plain SVD,
ASVD or SVD-LLM (`jaxcomp.lowrank`). Activation-aware methods record each layer's inputs in
the same sequential pipeline as `jaxcomp.ptq` (each block sees the already-factored blocks
before it); ``model`` is left untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.layers.lowrank import LowRankLinear
from jaxcomp.lowrank import core as lr
from jaxcomp.lowrank.spec import CALIBRATED_LOWRANK_METHODS, LowRank
from jaxcomp.ptq.api import LayerResult, _relative_error, plan_transform, solve_all
from jaxcomp.ptq.calibrate import LayerStats
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import nnx_rewrite

Array = jax.Array


def factor_kernel(w: Array, spec: LowRank, stats: LayerStats | None = None
                  ) -> tuple[Array, Array]:
  """The factors ``a (K, r)``, ``b (r, N)`` of one kernel as ``spec`` says.

  ``stats`` (the layer's calibration statistics: ``h``, ``mean_abs``) is needed by asvd and
  svd_llm.

  Example:
    >>> a, b = factor_kernel(jnp.ones((8, 6)), jc.LowRank(rank=2))
    >>> a.shape, b.shape
    ((8, 2), (2, 6))
  """
  k, n = w.shape
  if spec.method in CALIBRATED_LOWRANK_METHODS and stats is None:
    raise ValueError(f"LowRank.method={spec.method!r} needs calibration statistics")
  if spec.rank is not None:
    rank = spec.rank
  elif spec.reduction is not None:
    rank = lr.rank_for_reduction(k, n, spec.reduction)
  else:  # energy of the matrix the method truncates
    if spec.method == "svd":
      target = w
    elif spec.method == "asvd":
      target = (jnp.maximum(stats.mean_abs, 1e-6) ** spec.asvd_alpha)[:, None] * w
    else:
      h = stats.h + 1e-4 * jnp.mean(jnp.diag(stats.h)) * jnp.eye(k)
      target = jnp.linalg.cholesky(h).T @ w
    rank = lr.rank_for_energy(jnp.linalg.svd(target.astype(jnp.float32), compute_uv=False),
                              spec.energy)
  if spec.method == "svd":
    return lr.svd_factor(w, rank)
  if spec.method == "asvd":
    return lr.asvd_factor(w, stats.mean_abs, rank, alpha=spec.asvd_alpha)
  return lr.svd_llm_factor(w, stats.h, rank)


def _solver(root: nnx.Module, results: list[LayerResult]
            ) -> Callable[[str, nnx.Module, LowRank, LayerStats | None], None]:
  def solve(path: str, m: nnx.Module, spec: LowRank, stats: LayerStats | None) -> None:
    t0 = time.perf_counter()
    w = m.kernel[...]
    a, b = factor_kernel(w, spec, stats)
    nnx_rewrite._set_at(root, path, LowRankLinear.from_linear(m, a, b))  # pylint: disable=protected-access
    err = float("nan") if stats is None else _relative_error(w, a @ b, stats.h)
    results.append(LayerResult(path, spec.method, err, time.perf_counter() - t0, a.shape[1]))

  return solve


def factorize(model: nnx.Module, recipe: Recipe, calib: Any = None, *, batch_size: int = 8,
              blocks: str | None = None, call: Callable[[nnx.Module, Any], Any] | None = None,
              strict: bool = False, progress: bool = True, calib_dtype: Any = jnp.bfloat16,
              results: list[LayerResult] | None = None) -> nnx.Module:
  """Factors the linear layers the recipe's `LowRank` rules match; ``model`` is untouched.

  Args:
    model: an NNX model (``nnx.Linear`` layers are factored).
    recipe: rules with ``lowrank=jc.LowRank(...)`` (their ``quant`` / ``sparsity`` are ignored
      here).
    calib: calibration inputs (as for `jaxcomp.ptq`); required for asvd and svd_llm.
    batch_size, blocks, call, strict, progress, calib_dtype: as for `jaxcomp.ptq`.
    results: if a list is given, one `LayerResult` per factored layer (with its rank).

  Returns:
    The factored model.

  Example::

    recipe = jc.Recipe([jc.Rule(r".*_proj", lowrank=jc.LowRank(reduction=0.4, method="svd_llm"))])
    small = jc.factorize(model, recipe, calib=tokens)
  """
  call = call or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
  results = [] if results is None else results
  new, calibrated, plain = plan_transform("factorize", model, recipe, calib, {nnx.Linear: None},
                                          lambda r: r.lowrank, CALIBRATED_LOWRANK_METHODS,
                                          strict)
  for path, m, spec in calibrated + plain:
    if spec.rank is not None and spec.rank > min(m.kernel[...].shape):
      raise ValueError(f"{path}: LowRank.rank={spec.rank} is above min(in, out) = "
                       f"min{tuple(m.kernel[...].shape)}")
  solve = _solver(new, results)
  factor_plain = lambda layers: [solve(p, m, spec, None) for p, m, spec in layers]
  solve_all(new, calibrated, solve, plain, factor_plain, calib, name="factorize",
            batch_size=batch_size, blocks=blocks, call=call, progress=progress,
            calib_dtype=calib_dtype)
  return new


def param_count(model: nnx.Module) -> int:
  """Number of parameters (``nnx.Param`` leaves) of ``model``.

  Example:
    >>> param_count(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    36
  """
  return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
