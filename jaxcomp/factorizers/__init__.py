"""Low-rank factorization solvers (svd, asvd, svd_llm) over the numerics of `jaxcomp.lowrank`."""
