"""The one-shot solvers, one line each. A new method is one new file (its `Solver`, with its
``Options`` and spec ``check``) plus one line here; the transforms, the method names the specs
accept, each solver's options, "needs calibration" and "smooths its inputs" all come from this
table (entered into the specs' table, `jaxcomp.quant.spec.register_method`, at import).

Example:
  >>> names("quant")
  ('rtn', 'gptq', 'awq', 'smoothquant')
  >>> get("sparsity", "wanda").calibrated
  True
"""

from __future__ import annotations

from jaxcomp.factorizers import asvd, svd, svd_llm
from jaxcomp.oneshot.solver import KINDS, Solver
from jaxcomp.pruners import magnitude, sparsegpt, wanda
from jaxcomp.quant.spec import register_method
from jaxcomp.quantizers import awq, gptq, rtn, smoothquant

SOLVERS: tuple[Solver, ...] = (
    rtn.SOLVER,
    gptq.SOLVER,
    awq.SOLVER,
    smoothquant.SOLVER,
    magnitude.SOLVER,
    wanda.SOLVER,
    sparsegpt.SOLVER,
    svd.SOLVER,
    asvd.SOLVER,
    svd_llm.SOLVER,
)

for _solver in SOLVERS:
  register_method(_solver.kind, _solver)

# The spec field that names a solver of each kind (for messages).
FIELDS = {"quant": "Quant.method", "sparsity": "Sparsity.method", "lowrank": "LowRank.method"}


def names(kind: str) -> tuple[str, ...]:
  """The registered method names of one kind (``"quant"``, ``"sparsity"``, ``"lowrank"``)."""
  if kind not in KINDS:
    raise ValueError(f"solver kind must be one of {', '.join(KINDS)}; got {kind!r}")
  return tuple(s.name for s in SOLVERS if s.kind == kind)


def get(kind: str, name: str) -> Solver:
  """The solver ``name`` of ``kind``, or a one-line error listing the registered ones."""
  for s in SOLVERS:
    if s.kind == kind and s.name == name:
      return s
  raise ValueError(f"{FIELDS.get(kind, kind)}={name!r} is not a registered solver "
                   f"(solvers: {', '.join(names(kind))})")
