"""AWQ (Lin et al., 2023) as a registered solver: per-input-feature scales ``s`` searched on the
exact output error (`awq_core.awq`); the layer computes ``(x / s) @ Q(diag(s) W)``."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import (QuantSolution, Solver, check_option, check_solved_step,
                                    options_of)
from jaxcomp.quant.spec import Quant, SpecError
from jaxcomp.quantizers import awq_core, gptq_core


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """AWQ's options (``Quant(method="awq", options={...})``).

  Attributes:
    n_grid: points of the scale exponent's grid in [0, 1).
    clip: also search a weight clipping range per output (`awq_core.awq_clip`).
  """

  n_grid: int = 20
  clip: bool = False

  def __post_init__(self) -> None:
    check_option("awq", "n_grid", self.n_grid, int, 1)
    check_option("awq", "clip", self.clip, bool)


def check(spec: Quant) -> None:
  """AWQ is weight-only, symmetric, per channel or group."""
  check_solved_step(spec, symmetric=True)
  if spec.w_format != "int":
    raise SpecError(f"Quant.method='awq' searches clipping ratios on integer grids; "
                    f"w_format={spec.w_format!r} is not supported (use method='gptq' or 'rtn')")
  if spec.a_bits is not None:
    raise SpecError("Quant.method='awq' is weight-only (its search assumes float activations); "
                    "drop a_bits or use method='smoothquant'")


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """AWQ of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=4, group=128, method="awq"))
  """
  o = options_of(spec)
  w_hat_scaled, s = awq_core.awq(w, stats.h, stats.mean_abs, spec, n_grid=o.n_grid, clip=o.clip)
  step = gptq_core.weight_step(s[:, None] * w.astype(jnp.float32), spec)
  return QuantSolution(w_hat_scaled, step, s, w_hat_scaled / s[:, None])


SOLVER = Solver("awq", "quant", calibrated=True, layers=(nnx.Linear, nnx.LinearGeneral),
                solve=solve, options=Options, check=check, smooths_inputs=True)
