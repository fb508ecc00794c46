"""Pruning numerics on plain arrays (no Flax): masks (`masks`), importance scores (`scores`),
the `Sparsity` spec and block-sparse storage (`block_sparse`)."""

from jaxcomp.sparse.block_sparse import BlockSparse
from jaxcomp.sparse.block_sparse import block_sparse_matmul
from jaxcomp.sparse.masks import apply_mask
from jaxcomp.sparse.masks import block_mask
from jaxcomp.sparse.masks import global_masks
from jaxcomp.sparse.masks import nm_mask
from jaxcomp.sparse.masks import sparsity
from jaxcomp.sparse.masks import structured_keep
from jaxcomp.sparse.masks import structured_mask
from jaxcomp.sparse.masks import unstructured_mask
from jaxcomp.sparse.scores import input_norms
from jaxcomp.sparse.scores import magnitude
from jaxcomp.sparse.scores import movement
from jaxcomp.sparse.scores import taylor
from jaxcomp.sparse.scores import wanda
from jaxcomp.sparse.spec import Sparsity
from jaxcomp.sparse.training import cubic_schedule
from jaxcomp.sparse.training import sparsify

__all__ = [
    "BlockSparse",
    "Sparsity",
    "apply_mask",
    "block_mask",
    "block_sparse_matmul",
    "cubic_schedule",
    "global_masks",
    "input_norms",
    "magnitude",
    "movement",
    "nm_mask",
    "sparsify",
    "sparsity",
    "structured_keep",
    "structured_mask",
    "taylor",
    "unstructured_mask",
    "wanda",
]
