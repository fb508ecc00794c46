"""Budgeted search on plain arrays (no Flax): one candidate per layer under a budget."""

from jaxcomp.search.allocate import Allocation
from jaxcomp.search.allocate import allocate
from jaxcomp.search.allocate import frontier
from jaxcomp.search.allocate import min_cost
from jaxcomp.search.owl import outlier_ratio
from jaxcomp.search.owl import owl_sparsities

__all__ = [
    "Allocation",
    "allocate",
    "frontier",
    "min_cost",
    "outlier_ratio",
    "owl_sparsities",
]
