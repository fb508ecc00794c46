"""SparseGPT (Frantar & Alistarh, 2023): OBS reconstruction on the layer's input Hessian; the
kept weights change to absorb the pruned ones (unstructured and N:M)."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import Solver, check_option, options_of
from jaxcomp.pruners import sparsegpt_core
from jaxcomp.quant.spec import SpecError
from jaxcomp.sparse.spec import Sparsity


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """SparseGPT's options (``Sparsity(method="sparsegpt", options={...})``).

  Attributes:
    damp: dampening, a fraction of ``mean(diag(H))`` added to the diagonal, in (0, 1].
    block_size: columns per lazy-update block (mask selection is per block).
  """

  damp: float = 0.01
  block_size: int = 128

  def __post_init__(self) -> None:
    check_option("sparsegpt", "damp", self.damp, float, 0.0, 1.0, lo_open=True)
    check_option("sparsegpt", "block_size", self.block_size, int, 1)


def check(spec: Sparsity) -> None:
  """SparseGPT reconstructs column by column: unstructured and N:M, not whole tiles."""
  if spec.pattern == "block":
    raise SpecError("Sparsity.method='sparsegpt' supports patterns 'unstructured' and 'N:M', "
                    "not 'block'")


def solve(w: jax.Array, stats: LayerStats, spec: Sparsity) -> jax.Array:
  """The pruned (K, N) kernel.

  Example::

    w_pruned = solve(w, stats, jc.Sparsity("2:4", method="sparsegpt"))
  """
  o = options_of(spec)
  return sparsegpt_core.sparsegpt(w, stats.h, sparsity=spec.sparsity, nm=spec.nm,
                                  block_size=o.block_size, damp=o.damp).w_hat


SOLVER = Solver("sparsegpt", "sparsity", calibrated=True,
                layers=(nnx.Linear, nnx.LinearGeneral, nnx.Conv), solve=solve, options=Options,
                check=check)
