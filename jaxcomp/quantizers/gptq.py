"""GPTQ (Frantar et al., 2022) as a registered solver: `gptq_core.gptq` on the layer's input
Hessian, the kernel left on its grid with the solved step (and, for ``w_symmetric=False``, the
min-max grid's zero points: GPTQ's reference default)."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax

from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.solver import (QuantSolution, Solver, check_option, check_solved_step,
                                    options_of)
from jaxcomp.quant.spec import Quant
from jaxcomp.quantizers import gptq_core


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """GPTQ's options (``Quant(method="gptq", options={...})``).

  Attributes:
    act_order: quantize input features by decreasing Hessian diagonal.
    damp: dampening, a fraction of ``mean(diag(H))`` added to the diagonal, in (0, 1].
    block_size: columns per lazy-update block.
    keep_zeros: keep the kernel's exact zeros (a pruned kernel's mask: prune -> ptq
      pipelines) and compensate their error on the kept weights.
    float_acts: for a spec that quantizes activations (W4A8, W8A8...): the sequential
      calibration passes run this layer, once solved, with its weights quantized and its
      activations float, so every later layer is solved as for the weight-only model
      (QuaRot's order: weights by GPTQ first, activation quantizers after). The result
      quantizes the activations as the spec says. Linen one-shot transforms always calibrate
      this way.
  """

  act_order: bool = False
  damp: float = 0.01
  block_size: int = 128
  keep_zeros: bool = False
  float_acts: bool = False

  def __post_init__(self) -> None:
    check_option("gptq", "act_order", self.act_order, bool)
    check_option("gptq", "damp", self.damp, float, 0.0, 1.0, lo_open=True)
    check_option("gptq", "block_size", self.block_size, int, 1)
    check_option("gptq", "keep_zeros", self.keep_zeros, bool)
    check_option("gptq", "float_acts", self.float_acts, bool)


def check(spec: Quant) -> None:
  """GPTQ solves a step per output channel or group, not one per tensor."""
  check_solved_step(spec, symmetric=False)


def solve(w: jax.Array, stats: LayerStats, spec: Quant) -> QuantSolution:
  """GPTQ of one (K, N) kernel.

  Example::

    sol = solve(w, stats, jc.Quant(w_bits=4, group=128, method="gptq"))
  """
  o = options_of(spec)
  res = gptq_core.gptq(w, stats.h, spec, block_size=o.block_size, damp=o.damp,
                       act_order=o.act_order, keep_zeros=o.keep_zeros)
  return QuantSolution(res.w_hat, res.step, None, res.w_hat, res.zero)


SOLVER = Solver("gptq", "quant", calibrated=True, layers=(nnx.Linear, nnx.LinearGeneral, nnx.Conv),
                solve=solve, options=Options, check=check)
