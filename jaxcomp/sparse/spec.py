"""The sparsity spec of a recipe rule: which pattern, how much, scored how.

`Sparsity` is a frozen dataclass validated on construction (a bad value fails where it is
written, with the field's name in the message), like `jaxcomp.Quant`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jaxcomp.quant.spec import SolverOptions, SpecError, check_method, known_fields

PATTERNS = ("unstructured", "N:M", "block")
_NM = re.compile(r"(\d+):(\d+)")


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """How one layer's kernel is pruned.

  ``pattern`` is ``"unstructured"``, ``"N:M"`` written as the numbers (``"2:4"``: 2 kept of
  every 4 consecutive inputs), or ``"block"`` (whole ``block`` tiles of the ``(K, N)`` kernel).
  ``method`` scores the weights: ``"magnitude"`` (``|w|``, ranked over the whole layer),
  ``"wanda"`` (``|w| * ||x||``, ranked per output as in Sun et al. 2023; needs calibration)
  or ``"sparsegpt"`` (OBS reconstruction, Frantar & Alistarh 2023; needs calibration;
  unstructured and N:M).

  Example:
    >>> import jaxcomp as jc
    >>> jc.Sparsity("2:4", method="wanda").nm
    (2, 4)
    >>> jc.Sparsity(sparsity=0.5, method="sparsegpt").fraction
    0.5
    >>> jc.Sparsity("block", sparsity=0.9, block=(16, 16)).fraction
    0.9
  """

  pattern: str = "unstructured"  # "unstructured", "<N>:<M>" (e.g. "2:4") or "block".
  _: dataclasses.KW_ONLY
  sparsity: float = 0.5  # fraction pruned (unstructured, block); N:M prunes 1 - N/M.
  method: str = "magnitude"  # magnitude, wanda or sparsegpt (`jaxcomp.oneshot.registry`).
  options: Mapping[str, Any] = SolverOptions()  # the solver's options (sparsegpt: damp, block_size).
  block: tuple[int, int] = (16, 16)  # (bk, bn) tile of the (K, N) kernel, pattern "block".

  def __post_init__(self) -> None:
    o = "Sparsity"
    if not isinstance(self.pattern, str) or (
        self.pattern not in ("unstructured", "block") and not _NM.fullmatch(self.pattern)):
      raise SpecError(f"{o}.pattern must be 'unstructured', 'block' or 'N:M' like '2:4', "
                      f"got {self.pattern!r}")
    if self.nm is not None:
      n, m = self.nm
      if not 0 < n <= m:
        raise SpecError(f"{o}.pattern {self.pattern!r}: N:M needs 0 < N <= M")
    s = self.sparsity
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
      raise SpecError(f"{o}.sparsity must be a number in [0, 1), got {s!r}")
    block = tuple(self.block) if isinstance(self.block, (list, tuple)) else self.block
    if not (isinstance(block, tuple) and len(block) == 2 and all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
      raise SpecError(f"{o}.block must be two positive ints (bk, bn), got {self.block!r}")
    object.__setattr__(self, "block", block)
    object.__setattr__(self, "options", check_method(o, "sparsity", self))

  @property
  def nm(self) -> tuple[int, int] | None:
    """``(N, M)`` for an N:M pattern, else None."""
    match = _NM.fullmatch(self.pattern)
    return None if match is None else (int(match.group(1)), int(match.group(2)))

  @property
  def fraction(self) -> float:
    """The fraction of weights pruned (``1 - N/M`` for N:M)."""
    return 1.0 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain dict (``block`` as a list, for configs).

    Example:
      >>> Sparsity("2:4").to_dict()["pattern"]
      '2:4'
    """
    return {"pattern": self.pattern, "sparsity": self.sparsity, "method": self.method,
            "options": dict(self.options), "block": list(self.block)}

  @classmethod
  def from_dict(cls, d: Any) -> Sparsity:
    """Builds a spec from a mapping, rejecting unknown keys by name."""
    d = known_fields(cls, d)
    pattern = d.pop("pattern", "unstructured")
    if "block" in d and isinstance(d["block"], list):
      d["block"] = tuple(d["block"])
    return cls(pattern, **d)
