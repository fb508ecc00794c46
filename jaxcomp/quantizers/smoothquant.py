"""SmoothQuant (Xiao et al., 2022) as a registered solver: ``s`` migrates activation outliers
into the weights; the layer then runs W8A8 with per-token activations (weight scales
calibrated at run time)."""

from __future__ import annotations

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import QuantSolution, Solver
from jaxcomp.quant.spec import Quant
from jaxcomp.quantizers import gptq_core, smoothquant_core


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """SmoothQuant of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=8, a_bits=8, method="smoothquant"))
  """
  s = smoothquant_core.smooth_scales(stats.absmax, w, spec.smooth_alpha)
  ws = smoothquant_core.smooth(w, s)
  w_eff = gptq_core.rtn(ws, spec) / s[:, None]  # weights only; activations are dynamic
  return QuantSolution(ws, None, s, w_eff)


SOLVER = Solver("smoothquant", "quant", calibrated=True,
                layers=(nnx.Linear, nnx.LinearGeneral), solve=solve)
