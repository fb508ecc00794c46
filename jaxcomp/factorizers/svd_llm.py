"""SVD-LLM (Wang et al., 2024): SVD of the kernel whitened by the inputs' Cholesky factor, so
truncation minimises the layer's output error."""

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

    a, b = solve(w, stats, jc.LowRank(reduction=0.4, method="svd_llm"))
  """
  if spec.energy is None:
    rank = lr.choose_rank(spec, w)
  else:
    k = w.shape[0]
    h = stats.h + 1e-4 * jnp.mean(jnp.diag(stats.h)) * jnp.eye(k)
    rank = lr.choose_rank(spec, jnp.linalg.cholesky(h).T @ w)
  return lr.svd_llm_factor(w, stats.h, rank)


SOLVER = Solver("svd_llm", "lowrank", calibrated=True, layers=(nnx.Linear,), solve=solve)
