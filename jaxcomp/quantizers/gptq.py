"""GPTQ (Frantar et al., 2022) as a registered solver: `gptq_core.gptq` on the layer's input
Hessian, the kernel left on its grid with the solved step (and, for ``w_symmetric=False``, the
min-max grid's zero points: GPTQ's reference default)."""

from __future__ import annotations

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import QuantSolution, Solver
from jaxcomp.quant.spec import Quant
from jaxcomp.quantizers import gptq_core


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """GPTQ of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=4, group=128, method="gptq"))
  """
  res = gptq_core.gptq(w, stats.h, spec, damp=spec.damp, act_order=spec.act_order)
  return QuantSolution(res.w_hat, res.step, None, res.w_hat, res.zero)


SOLVER = Solver("gptq", "quant", calibrated=True, layers=(nnx.Linear, nnx.LinearGeneral),
                solve=solve)
