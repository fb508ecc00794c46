"""SparseGPT (Frantar & Alistarh, 2023): OBS reconstruction on the layer's input Hessian; the
kept weights change to absorb the pruned ones (unstructured and N:M)."""

from __future__ import annotations

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver
from jaxcomp.pruners import sparsegpt_core
from jaxcomp.sparse.spec import Sparsity


def solve(w: jax.Array, stats: LayerStats, spec: Sparsity) -> jax.Array:
  """The pruned (K, N) kernel.

  Example::

    w_pruned = solve(w, stats, jc.Sparsity("2:4", method="sparsegpt"))
  """
  return sparsegpt_core.sparsegpt(w, stats.h, sparsity=spec.sparsity, nm=spec.nm).w_hat


SOLVER = Solver("sparsegpt", "sparsity", calibrated=True,
                layers=(nnx.Linear, nnx.LinearGeneral), solve=solve)
