"""AWQ (Lin et al., 2023) as a registered solver: per-input-feature scales ``s`` searched on the
exact output error (`awq_core.awq`); the layer computes ``(x / s) @ Q(diag(s) W)``."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import QuantSolution, Solver
from jaxcomp.quant.spec import Quant
from jaxcomp.quantizers import awq_core, gptq_core


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """AWQ of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=4, group=128, method="awq"))
  """
  w_hat_scaled, s = awq_core.awq(w, stats.h, stats.mean_abs, spec)
  step = gptq_core.weight_step(s[:, None] * w.astype(jnp.float32), spec)
  return QuantSolution(w_hat_scaled, step, s, w_hat_scaled / s[:, None])


SOLVER = Solver("awq", "quant", calibrated=True, layers=(nnx.Linear, nnx.LinearGeneral),
                solve=solve)
