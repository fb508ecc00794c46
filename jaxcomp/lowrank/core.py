"""Low-rank factorization of a kernel on plain arrays (no Flax): ``W (K, N) ~ A (K, r) @ B (r, N)``.

* `svd_factor` -- truncated SVD, the best rank-r approximation of ``W`` itself (Eckart-Young).
* `asvd_factor` -- ASVD (Yuan et al. 2023, https://arxiv.org/abs/2312.05821): scale the input
  rows by ``s_k = mean|x_k|^alpha`` first, ``W ~ S^-1 svd_r(S W)``, so inputs that are large in
  practice are approximated better.
* `svd_llm_factor` -- SVD-LLM (Wang et al. 2024, https://arxiv.org/abs/2403.07378): whiten with
  the Cholesky factor ``L`` of the inputs' second moment ``H = X^T X`` (``H = L L^T``); since
  ``||X D||_F = ||L^T D||_F``, truncating the SVD of ``L^T W`` minimises the *output* error
  ``||X W - X A B||_F`` over all rank-r ``A B``, and ``W ~ L^-T svd_r(L^T W)``.

Ranks: `rank_for_reduction` (parameter budget: ``r (K + N) <= (1 - reduction) K N``) and
`rank_for_energy` (smallest ``r`` keeping a fraction of ``sum sigma^2``).

Example::

  a, b = svd_llm_factor(w, h, rank_for_reduction(*w.shape, 0.4))
  y = (x @ a) @ b
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant.finite import check_positive

Array = jax.Array

__all__ = ["asvd_factor", "rank_for_energy", "rank_for_reduction", "svd_factor",
           "svd_llm_factor"]


def _check_rank(rank: int, k: int, n: int) -> None:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if rank > min(k, n):
    raise ValueError(f"rank {rank} is above min(in, out) = min({k}, {n})")


def _split(u: Array, s: Array, vt: Array, rank: int) -> tuple[Array, Array]:
  """Rank-``rank`` factors with ``sqrt(sigma)`` on both sides (balanced scales)."""
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def svd_factor(w: Array, rank: int) -> tuple[Array, Array]:
  """Truncated SVD: ``w (K, N) ~ a (K, r) @ b (r, N)``, float32.

  Example:
    >>> w = jnp.outer(jnp.arange(1., 5.), jnp.arange(1., 4.))      # rank 1
    >>> a, b = svd_factor(w, 1)
    >>> a.shape, b.shape, bool(jnp.allclose(a @ b, w, atol=1e-5))
    ((4, 1), (1, 3), True)
  """
  w = jnp.asarray(w, jnp.float32)
  _check_rank(rank, *w.shape)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return _split(u, s, vt, rank)


def asvd_factor(w: Array, mean_abs: Array, rank: int, *, alpha: float = 0.5,
                eps: float = 1e-6) -> tuple[Array, Array]:
  """ASVD: ``w ~ diag(1/s) svd_r(diag(s) w)`` with ``s = max(mean|x|, eps)^alpha``.

  Args:
    w: kernel ``(K, N)``.
    mean_abs: ``[K]`` mean absolute input per feature over the calibration tokens.
    rank: ``r``.
    alpha: the scaling exponent (0.5 in the paper).

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (8, 6))
    >>> a, b = asvd_factor(w, jnp.ones(8), 6)                      # full rank: exact
    >>> bool(jnp.allclose(a @ b, w, atol=1e-4))
    True
  """
  w = jnp.asarray(w, jnp.float32)
  _check_rank(rank, *w.shape)
  if jnp.shape(mean_abs) != (w.shape[0],):
    raise ValueError(f"asvd_factor: mean_abs shape {jnp.shape(mean_abs)} must be ({w.shape[0]},)")
  s = jnp.maximum(jnp.asarray(mean_abs, jnp.float32), eps) ** alpha
  u, sig, vt = jnp.linalg.svd(s[:, None] * w, full_matrices=False)
  a, b = _split(u, sig, vt, rank)
  return a / s[:, None], b


def svd_llm_factor(w: Array, h: Array, rank: int, *, damp: float = 1e-4) -> tuple[Array, Array]:
  """SVD-LLM truncation-aware whitening: ``w ~ L^-T svd_r(L^T w)``, ``L L^T = h + damp``.

  Args:
    w: kernel ``(K, N)``.
    h: the inputs' second moment ``X^T X`` (any positive multiple, e.g. GPTQ's ``2 X^T X / n``),
      ``(K, K)``.
    rank: ``r``.
    damp: added to the diagonal, as a fraction of ``mean(diag(h))``, so the Cholesky factor
      exists for rank-deficient ``h``; a finite number > 0 (else a one-line `ValueError`).

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 6))
    >>> a, b = svd_llm_factor(w, x.T @ x, 6)                       # full rank: exact
    >>> bool(jnp.allclose(a @ b, w, atol=1e-3))
    True
  """
  check_positive("svd_llm_factor", "damp", damp)
  w = jnp.asarray(w, jnp.float32)
  _check_rank(rank, *w.shape)
  k = w.shape[0]
  if jnp.shape(h) != (k, k):
    raise ValueError(f"svd_llm_factor: h shape {jnp.shape(h)} must be ({k}, {k})")
  h = jnp.asarray(h, jnp.float32)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k) + 1e-12 * jnp.eye(k)
  chol = jnp.linalg.cholesky(h)  # lower, h = L L^T
  u, s, vt = jnp.linalg.svd(chol.T @ w, full_matrices=False)
  a, b = _split(u, s, vt, rank)
  a = jax.scipy.linalg.solve_triangular(chol.T, a, lower=False)  # L^-T a
  return a, b


def rank_for_reduction(k: int, n: int, reduction: float) -> int:
  """Largest ``r`` with ``r (K + N) <= (1 - reduction) K N`` (at least 1).

  Example:
    >>> rank_for_reduction(576, 1536, 0.4)        # 40% fewer parameters
    251
  """
  if not 0.0 <= reduction < 1.0:
    raise ValueError(f"reduction must be in [0, 1), got {reduction!r}")
  return max(1, min(int((1.0 - reduction) * k * n // (k + n)), min(k, n)))


def rank_for_energy(singular_values: Array, energy: float) -> int:
  """Smallest ``r`` whose top singular values keep ``energy`` of ``sum sigma^2``.

  Example:
    >>> rank_for_energy(jnp.array([3., 2., 1.]), 0.9)              # 9 + 4 of 14
    2
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"energy must be in (0, 1], got {energy!r}")
  sq = np.square(np.asarray(singular_values, np.float64))
  frac = np.cumsum(sq) / max(sq.sum(), 1e-300)
  return int(min(np.searchsorted(frac, energy - 1e-12) + 1, sq.size))


def choose_rank(spec: Any, target: Array) -> int:
  """The rank a `jaxcomp.LowRank` spec asks for, for a (K, N) kernel whose truncation acts on
  ``target`` (the matrix the method factors: the kernel, or its activation-scaled / whitened
  form; its singular values decide an ``energy`` spec).

  Example:
    >>> from jaxcomp.lowrank.spec import LowRank
    >>> choose_rank(LowRank(reduction=0.4), jnp.ones((576, 1536)))
    251
  """
  k, n = target.shape
  if spec.rank is not None:
    return spec.rank
  if spec.reduction is not None:
    return rank_for_reduction(k, n, spec.reduction)
  return rank_for_energy(jnp.linalg.svd(target.astype(jnp.float32), compute_uv=False),
                         spec.energy)
