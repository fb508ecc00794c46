"""ASVD (Yuan et al., 2023): SVD of the kernel scaled by the inputs' mean magnitude."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.lowrank import core as lr
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver


def solve(w: jax.Array, stats: LayerStats, spec: LowRank) -> tuple[jax.Array, jax.Array]:
  """Factors ``a (K, r)``, ``b (r, N)`` of a (K, N) kernel.

  Example::

    a, b = solve(w, stats, jc.LowRank(reduction=0.2, method="asvd"))
  """
  target = (jnp.maximum(stats.mean_abs, 1e-6) ** spec.asvd_alpha)[:, None] * w
  return lr.asvd_factor(w, stats.mean_abs, lr.choose_rank(spec, target), alpha=spec.asvd_alpha)


SOLVER = Solver("asvd", "lowrank", calibrated=True, layers=(nnx.Linear,), solve=solve)
