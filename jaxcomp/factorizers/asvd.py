"""ASVD (Yuan et al., 2023): SVD of the kernel scaled by the inputs' mean magnitude."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.lowrank import core as lr
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver, check_option, options_of


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """ASVD's options (``LowRank(method="asvd", options={...})``).

  Attributes:
    alpha: exponent of the activation scaling ``mean|x|^alpha``, in [0, 1].
  """

  alpha: float = 0.5

  def __post_init__(self) -> None:
    check_option("asvd", "alpha", self.alpha, float, 0.0, 1.0)


def solve(w: jax.Array, stats: LayerStats, spec: LowRank) -> tuple[jax.Array, jax.Array]:
  """Factors ``a (K, r)``, ``b (r, N)`` of a (K, N) kernel.

  Example::

    a, b = solve(w, stats, jc.LowRank(reduction=0.2, method="asvd"))
  """
  alpha = options_of(spec).alpha
  target = (jnp.maximum(stats.mean_abs, 1e-6) ** alpha)[:, None] * w
  return lr.asvd_factor(w, stats.mean_abs, lr.choose_rank(spec, target), alpha=alpha)


SOLVER = Solver("asvd", "lowrank", calibrated=True, layers=(nnx.Linear,), solve=solve,
                options=Options)
