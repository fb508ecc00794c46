"""One-shot pruning solvers (magnitude, wanda, sparsegpt); ``sparsegpt_core.py`` is its math on
plain arrays. Masks and scores live in `jaxcomp.sparse`."""
