"""Low-rank numerics on plain arrays (no Flax): SVD, ASVD and SVD-LLM factors, rank choices."""

from jaxcomp.lowrank.core import asvd_factor
from jaxcomp.lowrank.core import rank_for_energy
from jaxcomp.lowrank.core import rank_for_reduction
from jaxcomp.lowrank.core import svd_factor
from jaxcomp.lowrank.core import svd_llm_factor

__all__ = [
    "asvd_factor",
    "rank_for_energy",
    "rank_for_reduction",
    "svd_factor",
    "svd_llm_factor",
]
