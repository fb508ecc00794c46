"""The `Solver` record every one-shot method registers (`jaxcomp.oneshot.registry`).

A solver works on one layer's kernel viewed as ``(K, N)`` (`jaxcomp.rewrite.engine.kernel_axes`:
K the contracting axes flattened in order, N the others) and, when ``calibrated``, the
`LayerStats` of the layer's inputs; the transform (`jaxcomp.ptq` / `prune` / `factorize`) puts
its result back into the model. What it returns depends on its ``kind``:

* ``"quant"``: `QuantSolution` (kernel on the grid, its step, an input smoothing), or None
  for a data-free method whose layer is quantized as QAT would (RTN).
* ``"sparsity"``: the pruned ``(K, N)`` kernel.
* ``"lowrank"``: the factors ``a (K, r)``, ``b (r, N)``.

A solver's settings are its own ``Options`` dataclass (one default per field, validated on
construction); a spec sets them by name (``Quant(method="gptq", options={"act_order":
True})``) and the solver reads them with `jaxcomp.quant.spec.options_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.quant.spec import Quant, SpecError, options_of

Array = jax.Array
KINDS = ("quant", "sparsity", "lowrank")
__all__ = ["KINDS", "QuantSolution", "Solver", "check_option", "check_solved_step", "options_of",
           "relative_error"]  # options_of: re-exported for the solver files


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
      inputs `jaxcomp.oneshot.calibrate.Capture` / ``ConvCapture`` record: ``nnx.Linear``,
      ``LinearGeneral``, ``Conv`` (its input patches)).
    layers: the NNX layer types it can solve (exact types).
    solve: ``solve(w (K, N), stats or None, spec) -> result`` (see the module docstring).
    options: the solver's options dataclass (keyword fields, one default each, a
      `jaxcomp.SpecError` from ``__post_init__`` for a bad value), or None.
    check: optional ``check(spec) -> None`` raising a one-line `jaxcomp.SpecError` when the
      spec asks for something the solver cannot do; run when the spec is built.
    smooths_inputs: the solved layer divides its inputs by a solved (K,) vector (a
      `jaxcomp.layers.SmoothScale` the packed form keeps).
  """

  name: str
  kind: str
  calibrated: bool
  layers: tuple[type, ...]
  solve: Callable[[Array, LayerStats | None, Any], Any] | None
  options: type | None = None
  check: Callable[[Any], None] | None = None
  smooths_inputs: bool = False


def check_solved_step(spec: Any, *, symmetric: bool) -> None:
  """A one-line `jaxcomp.SpecError` unless a quant solver that fixes the step per output channel
  or group (and, with ``symmetric``, keeps no zero point) can solve ``spec``.

  Example:
    >>> check_solved_step(Quant(w_bits=4, group=128, method="gptq"), symmetric=False)
  """
  m = spec.method
  if symmetric and not spec.w_symmetric:
    raise SpecError(f"Quant.method={m!r} needs w_symmetric=True (solved weights keep a fixed "
                    "symmetric step per channel/group)")
  if spec.granularity == "tensor":
    raise SpecError(f"Quant.method={m!r} needs granularity 'channel' or 'group'")


def check_option(solver: str, name: str, value: Any, kind: type, lo: float | None = None,
                 hi: float | None = None, *, lo_open: bool = False) -> None:
  """A one-line `jaxcomp.SpecError` unless ``value`` is a ``kind`` (bool, int or float; an int
  passes as a float) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

  Example:
    >>> check_option("gptq", "damp", 0.01, float, 0.0, 1.0, lo_open=True)
  """
  ok = isinstance(value, bool) if kind is bool else (
      not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
  if ok and lo is not None:
    ok = (lo < value if lo_open else lo <= value) and (hi is None or value <= hi)
  if not ok:
    what = {bool: "a bool", int: "an int", float: "a number"}[kind]
    if lo is not None:
      what += f" in {'(' if lo_open else '['}{lo:g}, " + (f"{hi:g}]" if hi is not None else "inf)")
    raise SpecError(f"{solver} option {name} must be {what}, got {value!r}")


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
