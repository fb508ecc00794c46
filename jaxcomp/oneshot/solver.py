"""The `Solver` record every one-shot method registers (`jaxcomp.oneshot.registry`).

A solver works on one layer's kernel viewed as ``(K, N)`` (`jaxcomp.rewrite.engine.kernel_axes`:
K the contracting axes flattened in order, N the others) and, when ``calibrated``, the
`LayerStats` of the layer's inputs; the transform (`jaxcomp.ptq` / `prune` / `factorize`) puts
its result back into the model. What it returns depends on its ``kind``:

* ``"quant"``: `QuantSolution` (kernel on the grid, its step, an input smoothing), or None
  for a data-free method whose layer is quantized as QAT would (RTN).
* ``"sparsity"``: the pruned ``(K, N)`` kernel.
* ``"lowrank"``: the factors ``a (K, r)``, ``b (r, N)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.oneshot.calibrate import LayerStats

Array = jax.Array
KINDS = ("quant", "sparsity", "lowrank")


class QuantSolution(NamedTuple):
  """A quantization solver's answer for one ``(K, N)`` kernel.

  Attributes:
    kernel: (K, N) the new kernel (on its grid; for smoothing methods, in the smoothed frame).
    step: (G, N) its step (G = 1 per channel, ceil(K / group) per group), or None to
      calibrate at run time (SmoothQuant's W8A8).
    in_scale: (K,) input smoothing (the layer computes ``(x / s) @ kernel``), or None.
    effective: (K, N) what the layer now computes in the original frame (for the error).
    zero: (G, N) integer-valued zero points of an asymmetric grid, or None.
  """

  kernel: Array
  step: Array | None
  in_scale: Array | None
  effective: Array
  zero: Array | None = None


@dataclasses.dataclass(frozen=True)
class Solver:
  """One registered one-shot method.

  Attributes:
    name: the value of ``method`` in the spec that selects it (``Quant.method``,
      ``Sparsity.method``, ``LowRank.method``).
    kind: ``"quant"``, ``"sparsity"`` or ``"lowrank"``.
    calibrated: whether it needs calibration statistics (then the layer must be one whose
      inputs `jaxcomp.oneshot.calibrate.Capture` records: ``nnx.Linear`` / ``LinearGeneral``).
    layers: the NNX layer types it can solve (exact types).
    solve: ``solve(w (K, N), stats or None, spec) -> result`` (see the module docstring).
    check: optional ``check(spec, k, n) -> None`` raising a one-line ValueError when the
      spec does not fit a (K, N) kernel.
  """

  name: str
  kind: str
  calibrated: bool
  layers: tuple[type, ...]
  solve: Callable[[Array, LayerStats | None, Any], Any] | None
  check: Callable[[Any, int, int], None] | None = None


def relative_error(w: Array, w_eff: Array, h: Array) -> float:
  """``||X (W_eff - W)||^2 / ||X W||^2`` from the inputs' Hessian ``h = 2 X^T X / n``.

  Example:
    >>> relative_error(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.eye(2))
    1.0
  """
  d = (w_eff - w).astype(jnp.float32)
  num = jnp.sum(d * (h @ d))
  wf = w.astype(jnp.float32)
  den = jnp.sum(wf * (h @ wf))
  return float(num / jnp.maximum(den, 1e-30))
