"""Magnitude pruning: ``|w|`` ranked over the layer (or per N:M group / per block); no data."""

from __future__ import annotations

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver
from jaxcomp.sparse import masks, scores
from jaxcomp.sparse.spec import Sparsity


def solve(w: jax.Array, stats: LayerStats | None, spec: Sparsity) -> jax.Array:
  """The pruned (K, N) kernel.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> int((solve(w, None, Sparsity("2:4")) == 0).sum())
    16
  """
  del stats
  return masks.apply_mask(w, masks.mask_for_spec(scores.magnitude(w), spec))


SOLVER = Solver("magnitude", "sparsity", calibrated=False,
                layers=(nnx.Linear, nnx.LinearGeneral, nnx.Conv), solve=solve)
