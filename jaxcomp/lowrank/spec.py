"""The low-rank spec of a recipe rule: how a layer's rank is chosen and how it is factored."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxcomp.quant.spec import (SolverOptions, SpecError, check_method, known_fields,
                                migrate_moved, moved_to_options)

# Fields of earlier versions that are solver options now: old field -> (method, option).
LOWRANK_MOVED = {"asvd_alpha": ("asvd", "alpha")}


@moved_to_options(LOWRANK_MOVED)
@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRank:
  """How one layer is factored into ``(in -> r) -> (r -> out)``.

  Exactly one of ``rank`` (fixed), ``reduction`` (parameter budget: the two factors hold at
  most ``1 - reduction`` of the layer's weights) or ``energy`` (smallest rank keeping that
  fraction of ``sum sigma^2`` of the matrix the method factors) picks the rank. ``method``:
  ``"svd"`` (plain), ``"asvd"`` (activation-aware scaling, needs calibration) or
  ``"svd_llm"`` (whitening by the inputs' Cholesky factor, needs calibration); ``options``
  sets the solver's options (asvd: ``alpha``, the exponent of the activation scaling).

  Example:
    >>> import jaxcomp as jc
    >>> jc.LowRank(reduction=0.4, method="svd_llm").method
    'svd_llm'
  """

  rank: int | None = None
  reduction: float | None = None
  energy: float | None = None
  method: str = "svd"  # svd, asvd or svd_llm (`jaxcomp.oneshot.registry`).
  options: Mapping[str, Any] = SolverOptions()  # the solver's options (asvd: alpha).

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
    object.__setattr__(self, "options", check_method(o, "lowrank", self))

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain dict."""
    return {**dataclasses.asdict(self), "options": dict(self.options)}

  @classmethod
  def from_dict(cls, d: Any) -> LowRank:
    """Builds a spec from a mapping, rejecting unknown keys by name (an earlier version's
    ``asvd_alpha`` field becomes asvd's ``alpha`` option)."""
    return cls(**known_fields(cls, migrate_moved(dict(d), LOWRANK_MOVED, "svd")))
