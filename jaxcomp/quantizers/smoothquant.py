"""SmoothQuant (Xiao et al., 2022) as a registered solver: ``s`` migrates activation outliers
into the weights; the layer then runs W8A8 with per-token activations (weight scales
calibrated at run time)."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import (QuantSolution, Solver, check_option, check_solved_step,
                                    options_of)
from jaxcomp.quant.spec import Quant, SpecError
from jaxcomp.quantizers import gptq_core, smoothquant_core


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """SmoothQuant's options (``Quant(method="smoothquant", options={...})``).

  Attributes:
    alpha: migration strength in [0, 1] (``s = max|x|^alpha / max|w|^(1 - alpha)``).
  """

  alpha: float = 0.5

  def __post_init__(self) -> None:
    check_option("smoothquant", "alpha", self.alpha, float, 0.0, 1.0)


def check(spec: Quant) -> None:
  """SmoothQuant is W8A8-style: symmetric weights per channel or group, quantized activations."""
  check_solved_step(spec, symmetric=True)
  if spec.a_bits is None:
    raise SpecError("Quant.method='smoothquant' migrates activation outliers for W8A8: set a_bits")


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """SmoothQuant of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=8, a_bits=8, method="smoothquant"))
  """
  s = smoothquant_core.smooth_scales(stats.absmax, w, options_of(spec).alpha)
  ws = smoothquant_core.smooth(w, s)
  w_eff = gptq_core.rtn(ws, spec) / s[:, None]  # weights only; activations are dynamic
  return QuantSolution(ws, None, s, w_eff)


SOLVER = Solver("smoothquant", "quant", calibrated=True,
                layers=(nnx.Linear, nnx.LinearGeneral), solve=solve, options=Options,
                check=check, smooths_inputs=True)
