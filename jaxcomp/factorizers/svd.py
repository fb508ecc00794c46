"""Plain truncated SVD of the kernel (no data)."""

from __future__ import annotations

from flax import nnx
import jax

from jaxcomp.lowrank import core as lr
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver


def solve(w: jax.Array, stats: LayerStats | None, spec: LowRank) -> tuple[jax.Array, jax.Array]:
  """Factors ``a (K, r)``, ``b (r, N)`` of a (K, N) kernel.

  Example:
    >>> a, b = solve(jnp.ones((8, 6)), None, LowRank(rank=2))
    >>> a.shape, b.shape
    ((8, 2), (2, 6))
  """
  del stats
  return lr.svd_factor(w, lr.choose_rank(spec, w))


SOLVER = Solver("svd", "lowrank", calibrated=False, layers=(nnx.Linear,), solve=solve)
