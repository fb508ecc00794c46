"""The low-rank spec of a recipe rule: how a layer's rank is chosen and how it is factored."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcomp.quant.spec import SpecError, known_fields

LOWRANK_METHODS = ("svd", "asvd", "svd_llm")
# Methods that need calibration inputs.
CALIBRATED_LOWRANK_METHODS = ("asvd", "svd_llm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRank:
  """How one layer is factored into ``(in -> r) -> (r -> out)``.

  Exactly one of ``rank`` (fixed), ``reduction`` (parameter budget: the two factors hold at
  most ``1 - reduction`` of the layer's weights) or ``energy`` (smallest rank keeping that
  fraction of ``sum sigma^2`` of the matrix the method factors) picks the rank. ``method``:
  ``"svd"`` (plain), ``"asvd"`` (activation-aware scaling, needs calibration) or
  ``"svd_llm"`` (whitening by the inputs' Cholesky factor, needs calibration).

  Example:
    >>> import jaxcomp as jc
    >>> jc.LowRank(reduction=0.4, method="svd_llm").method
    'svd_llm'
  """

  rank: int | None = None
  reduction: float | None = None
  energy: float | None = None
  method: str = "svd"
  asvd_alpha: float = 0.5

  def __post_init__(self) -> None:
    o = "LowRank"
    given = [n for n in ("rank", "reduction", "energy") if getattr(self, n) is not None]
    if len(given) != 1:
      raise SpecError(f"{o}: give exactly one of rank, reduction, energy (got "
                      f"{', '.join(given) or 'none'})")
    if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                  or self.rank < 1):
      raise SpecError(f"{o}.rank must be a positive int, got {self.rank!r}")
    if self.reduction is not None and not (
        isinstance(self.reduction, (int, float)) and 0.0 <= self.reduction < 1.0):
      raise SpecError(f"{o}.reduction must be a number in [0, 1), got {self.reduction!r}")
    if self.energy is not None and not (
        isinstance(self.energy, (int, float)) and 0.0 < self.energy <= 1.0):
      raise SpecError(f"{o}.energy must be a number in (0, 1], got {self.energy!r}")
    if self.method not in LOWRANK_METHODS:
      raise SpecError(f"{o}.method must be one of {', '.join(LOWRANK_METHODS)}; "
                      f"got {self.method!r}")
    if not isinstance(self.asvd_alpha, (int, float)) or not 0.0 <= self.asvd_alpha <= 1.0:
      raise SpecError(f"{o}.asvd_alpha must be a number in [0, 1], got {self.asvd_alpha!r}")

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Any) -> LowRank:
    """Builds a spec from a mapping, rejecting unknown keys by name."""
    return cls(**known_fields(cls, d))
