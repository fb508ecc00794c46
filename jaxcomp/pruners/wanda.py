"""Wanda (Sun et al., 2023): ``|w| * ||x||`` ranked per output for unstructured sparsity, with
the input norms from the calibration pass (``||x_k|| ~ sqrt(H_kk)``)."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver
from jaxcomp.sparse import masks, scores
from jaxcomp.sparse.spec import Sparsity


def solve(w: jax.Array, stats: LayerStats, spec: Sparsity) -> jax.Array:
  """The pruned (K, N) kernel.

  Example::

    w_pruned = solve(w, stats, jc.Sparsity(sparsity=0.5, method="wanda"))
  """
  s = scores.wanda(w, jnp.sqrt(jnp.maximum(jnp.diag(stats.h), 0.0)))
  return masks.apply_mask(w, masks.mask_for_spec(s, spec, per_output=True))


SOLVER = Solver("wanda", "sparsity", calibrated=True, layers=(nnx.Linear, nnx.LinearGeneral, nnx.Conv),
                solve=solve)
