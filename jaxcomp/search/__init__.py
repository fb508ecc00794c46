"""Budgeted search on plain arrays (no Flax): one candidate per layer under a budget."""

from jaxcomp.search.allocate import Allocation
from jaxcomp.search.allocate import allocate
from jaxcomp.search.allocate import frontier
from jaxcomp.search.allocate import min_cost

__all__ = [
    "Allocation",
    "allocate",
    "frontier",
    "min_cost",
]
