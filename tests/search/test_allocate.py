"""The per-layer budget solver (`jaxcomp.search.allocate`) against brute force."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from jaxcomp.search import allocate, frontier, min_cost


def _brute(costs, losses, budget):
  """Least summed loss over every combination within the budget (None: none fits)."""
  best = None
  for choice in itertools.product(*[range(len(c)) for c in costs]):
    cost = sum(c[i] for c, i in zip(costs, choice))
    loss = sum(s[i] for s, i in zip(losses, choice))
    if cost <= budget and (best is None or loss < best):
      best = loss
  return best


@st.composite
def instances(draw):
  layers = draw(st.integers(1, 5))
  costs, losses = [], []
  for _ in range(layers):
    n = draw(st.integers(1, 4))
    costs.append(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)))
    losses.append(draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)))
  lo, hi = min_cost(costs), sum(max(c) for c in costs)
  return costs, losses, draw(st.integers(int(lo), int(hi) + 2))


@settings(max_examples=200, deadline=None)
@given(instances())
def test_dp_is_the_brute_force_optimum_and_within_budget(instance):
  costs, losses, budget = instance
  a = allocate(costs, losses, budget)
  assert a.cost <= budget
  assert a.loss == _brute(costs, losses, budget)
  assert a.cost == sum(c[i] for c, i in zip(costs, a.choice))


@settings(max_examples=200, deadline=None)
@given(instances())
def test_lagrangian_fits_the_budget_and_never_beats_the_optimum(instance):
  costs, losses, budget = instance
  a = allocate(costs, losses, budget, method="lagrangian")
  assert a.cost <= budget
  assert a.loss >= _brute(costs, losses, budget)


@settings(max_examples=100, deadline=None)
@given(instances())
def test_frontier_is_the_optimum_at_each_of_its_costs(instance):
  costs, losses, _ = instance
  cost, loss = frontier(costs, losses)
  assert cost[0] == min_cost(costs) and (np.diff(cost) > 0).all() and (np.diff(loss) < 0).all()
  for c, s in zip(cost, loss):
    assert s == _brute(costs, losses, c)


def test_bit_costs_use_their_gcd_and_forbidden_candidates_are_skipped():
  # 576x576 and 576x1536 kernels at 2 / 4 / 8 bits, groups of 128 (scale bits 16 / 128)
  sizes = [576 * 576, 576 * 1536]
  costs = [[n * b + n // 128 * 16 for b in (2, 4, 8)] for n in sizes]
  losses = [[5.0, 1.0, 0.0], [9.0, np.inf, 0.5]]  # 4 bits forbidden for the second
  budget = costs[0][1] + costs[1][2]
  a = allocate(costs, losses, budget)
  assert a.choice.tolist() == [1, 2] and a.loss == 1.5


@pytest.mark.parametrize("call, message", [
    (lambda: allocate([[4, 8], [2]], [[1, 0], [0]], 5),
     "budget 5 is below the least achievable total 6"),
    (lambda: allocate([[4, 8]], [[1, 0], [0]], 9), "one row per layer"),
    (lambda: allocate([[4, 8]], [[1]], 9), "layer 0 has"),
    (lambda: allocate([[4, -1]], [[1, 0]], 9), "costs must be finite and >= 0"),
    (lambda: allocate([[4, 8]], [[1, np.nan]], 9), "not NaN"),
    (lambda: allocate([[0.5, 1.5]], [[1, 0]], 9), "not integers; pass unit="),
    (lambda: allocate([[0.5, 1.5]], [[1, 0]], 9, unit=0.2), "multiple of unit=0.2"),
    (lambda: allocate([[4, 8]], [[1, 0]], 9, method="greedy"), "'dp' or 'lagrangian'"),
    (lambda: allocate([[1, 10**9]], [[1, 0]], 10**9), "exceed"),
])
def test_bad_input_is_one_line(call, message):
  with pytest.raises(ValueError, match=message) as e:
    call()
  assert "\n" not in str(e.value)


def test_float_costs_with_a_unit():
  a = allocate([[0.5, 1.5], [0.5, 1.0]], [[3.0, 0.0], [2.0, 1.0]], 2.0, unit=0.5)
  assert a.choice.tolist() == [1, 0] and a.cost == 2.0 and a.loss == 2.0
