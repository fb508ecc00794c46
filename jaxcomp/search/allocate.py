"""One candidate per layer under a budget: the multiple-choice knapsack, on plain arrays.

Layer ``l`` has candidates ``c`` (a bit width, a sparsity, a rank, ...) with a cost
``costs[l][c]`` (bits, bytes, FLOPs: anything that adds up over layers) and a predicted loss
``losses[l][c]`` (a sensitivity score that adds up over layers). `allocate` picks one
candidate per layer minimising the summed loss with the summed cost at most ``budget``:

* ``method="dp"`` (default, exact): dynamic programming over the budget counted in ``unit``
  (by default the greatest common divisor of the integer costs, so that no cost is rounded):
  ``O(L * C * budget / unit)`` time, ``L * budget / unit`` bytes for the choices;
* ``method="lagrangian"``: the smallest multiplier ``lam`` for which every layer's
  ``argmin_c loss + lam * cost`` fits the budget (bisection). Exact on the lower convex hull
  of the (cost, loss) trade-off and cheap for any budget, but it can leave budget unused
  where the optimum is not on that hull.

`frontier` gives the whole trade-off the DP computes: the least predicted loss at every
achievable total cost.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import numpy as np

_MAX_CELLS = 400_000_000  # layers x budget states of the DP's choice table (one byte each)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One candidate index per layer (``choice: int[L]``), its summed cost and loss."""

  choice: np.ndarray
  cost: float
  loss: float


def _tables(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``[L, C]`` cost and loss tables padded with (cheapest cost, +inf loss), and the counts."""
  if len(costs) != len(losses) or not len(costs):
    raise ValueError(f"allocate: costs and losses need one row per layer, the same number of "
                     f"rows (at least one); got {len(costs)} and {len(losses)}")
  counts = np.array([len(c) for c in costs])
  for l, (c, s) in enumerate(zip(costs, losses)):
    c, s = np.asarray(c, np.float64), np.asarray(s, np.float64)
    if c.ndim != 1 or c.shape != s.shape or not len(c):
      raise ValueError(f"allocate: layer {l} has {c.shape} costs and {s.shape} losses; need "
                       "the same number (at least one), one per candidate")
    if not (np.isfinite(c).all() and (c >= 0).all()):
      raise ValueError(f"allocate: layer {l}'s costs must be finite and >= 0, got {c.tolist()}")
    if np.isnan(s).any() or np.isneginf(s).any():
      raise ValueError(f"allocate: layer {l}'s losses must be numbers (not NaN or -inf), got "
                       f"{s.tolist()}")
  width = int(counts.max())
  cost = np.zeros((len(costs), width))
  loss = np.full((len(costs), width), np.inf)
  for l, (c, s) in enumerate(zip(costs, losses)):
    cost[l] = np.min(c)
    cost[l, :len(c)], loss[l, :len(c)] = c, s
  return cost, loss, counts


def min_cost(costs: Sequence[Sequence[float]]) -> float:
  """The least achievable total: every layer at its cheapest candidate.

  Example:
    >>> min_cost([[4, 8], [2, 3]])
    6.0
  """
  return float(sum(np.min(np.asarray(c, np.float64)) for c in costs))


def _unit(cost: np.ndarray, unit: float | None) -> float:
  if unit is None:
    if not np.array_equal(cost, np.round(cost)):
      raise ValueError("allocate: costs are not integers; pass unit= (every cost a multiple "
                       "of it) or method='lagrangian'")
    g = int(np.gcd.reduce(cost.astype(np.int64).ravel()))
    return float(g or 1)
  if unit <= 0:
    raise ValueError(f"allocate: unit must be > 0, got {unit}")
  steps = cost / unit
  if not np.allclose(steps, np.round(steps), rtol=0, atol=1e-9):
    raise ValueError(f"allocate: every cost must be a multiple of unit={unit}")
  return float(unit)


def _dp(cost: np.ndarray, loss: np.ndarray, budget: float, unit: float | None
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """The DP: ``best[b]`` = least loss with total cost <= b units, the choice table, the
  integer costs and the unit."""
  u = _unit(cost, unit)
  w = np.round(cost / u).astype(np.int64)
  n = int(math.floor(budget / u + 1e-9))
  if cost.shape[0] * (n + 1) > _MAX_CELLS:
    raise ValueError(f"allocate: the budget is {n} units of {u:g}; {cost.shape[0]} layers x "
                     f"{n + 1} states exceed {_MAX_CELLS:,} (pass a coarser unit= or "
                     "method='lagrangian')")
  best = np.zeros(n + 1)  # no layers: loss 0 at any budget
  arg = np.zeros((cost.shape[0], n + 1), np.uint8 if cost.shape[1] < 256 else np.int32)
  for l in range(cost.shape[0]):
    new = np.full(n + 1, np.inf)
    for c in range(cost.shape[1]):
      if not np.isfinite(loss[l, c]) or w[l, c] > n:
        continue
      cand = np.full(n + 1, np.inf)
      cand[w[l, c]:] = best[:n + 1 - w[l, c]] + loss[l, c]
      better = cand < new
      new[better] = cand[better]
      arg[l, better] = c
    best = new
  return best, arg, w, u


def allocate(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]],
             budget: float, *, method: str = "dp", unit: float | None = None) -> Allocation:
  """The candidate per layer minimising the summed loss with the summed cost <= ``budget``.

  Args:
    costs, losses: one sequence per layer, one entry per candidate (layers may have
      different numbers of candidates). A loss of ``+inf`` forbids a candidate.
    budget: the most the chosen costs may add up to.
    method: ``"dp"`` (exact) or ``"lagrangian"`` (module docstring).
    unit: the DP's budget step (every cost a multiple of it); default: the costs' GCD.

  Returns:
    `Allocation` (``choice: int[L]``, ``cost``, ``loss``).

  Example:
    >>> a = allocate([[2, 4, 8], [2, 4, 8]], [[9, 3, 1], [5, 2, 0]], budget=10)
    >>> a.choice.tolist(), a.cost, a.loss
    ([1, 1], 8.0, 5.0)
  """
  cost, loss, _ = _tables(costs, losses)
  floor = float(cost.min(axis=1).sum())
  if budget < floor - 1e-9 * max(1.0, abs(floor)):
    raise ValueError(f"allocate: budget {budget:g} is below the least achievable total "
                     f"{floor:g} (every layer at its cheapest candidate)")
  if method == "dp":
    best, arg, w, _ = _dp(cost, loss, budget, unit)
    b = len(best) - 1
    if not np.isfinite(best[b]):
      raise ValueError(f"allocate: no allocation within budget {budget:g} has a finite loss")
    choice = np.zeros(cost.shape[0], np.int64)
    for l in range(cost.shape[0] - 1, -1, -1):
      choice[l] = arg[l, b]
      b -= w[l, choice[l]]
  elif method == "lagrangian":
    choice = _lagrangian(cost, loss, budget)
  else:
    raise ValueError(f"allocate: method must be 'dp' or 'lagrangian', got {method!r}")
  rows = np.arange(cost.shape[0])
  return Allocation(choice=choice, cost=float(cost[rows, choice].sum()),
                    loss=float(loss[rows, choice].sum()))


def _lagrangian(cost: np.ndarray, loss: np.ndarray, budget: float) -> np.ndarray:
  """The choice of the smallest multiplier whose per-layer argmins fit ``budget``."""
  rows = np.arange(cost.shape[0])

  def pick(lam: float) -> np.ndarray:
    # ties on the penalised loss go to the cheaper candidate (then the lower index)
    score = loss + lam * cost
    best = score.min(axis=1, keepdims=True)
    tied = np.where(score <= best, cost, np.inf)
    return np.argmin(tied, axis=1)

  def total(c: np.ndarray) -> float:
    return float(cost[rows, c].sum())

  if total(pick(0.0)) <= budget:
    return pick(0.0)
  finite = loss[np.isfinite(loss)]
  spread = float(finite.max() - finite.min()) if finite.size else 1.0
  gaps = np.diff(np.unique(cost))
  hi = (spread + 1.0) / (float(gaps.min()) if gaps.size else 1.0)
  while total(pick(hi)) > budget:
    hi *= 2.0
  lo = 0.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if total(pick(mid)) <= budget:
      hi = mid
    else:
      lo = mid
  return pick(hi)


def frontier(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], *,
             max_cost: float | None = None, unit: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """The exact trade-off: ``(cost[k], loss[k])``, the least summed loss at each total cost
  where it drops, from the least achievable total up to ``max_cost`` (default: every layer
  at its most expensive candidate).

  Example:
    >>> frontier([[2, 4], [2, 4]], [[3, 1], [5, 2]])
    (array([4., 6., 8.]), array([8., 5., 3.]))
  """
  cost, loss, _ = _tables(costs, losses)
  top = float(cost.max(axis=1).sum()) if max_cost is None else float(max_cost)
  best, _, _, u = _dp(cost, loss, top, unit)
  finite = np.isfinite(best)
  drops = finite & np.concatenate([[True], best[1:] < best[:-1]])
  idx = np.nonzero(drops)[0]
  return idx * u, best[idx]
