"""Hadamard matrices and the fast Walsh-Hadamard transform, for outlier-spreading rotations.

A Hadamard matrix ``H`` of order n has entries +-1 and ``H H^T = n I``, so ``H / sqrt(n)`` is
orthogonal; multiplying activations by it spreads an outlier channel over all channels (QuaRot,
Ashkboos et al., 2024), which makes them easier to quantize, and the inverse folds into the
next weight. Orders built here: ``n = m 2^k`` with ``m = 1`` (Sylvester), or ``m`` a Paley
order: ``q + 1`` for a prime ``q = 3 mod 4`` (Paley I: 4, 8, 12, 20, 24, 32, 44, 48, ...) or
``2 (q + 1)`` for a prime ``q = 1 mod 4`` (Paley II: 12, 28, 36, 60, ...). SmolLM2's widths:
576 = 36 x 16 and 1536 = 12 x 128.

`fwht` applies ``x @ H / sqrt(n)`` in ``O(n log n)`` for the power-of-two factor (butterflies)
plus an ``m x m`` product, and equals the dense product with `hadamard_matrix` (normalized).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(m: int) -> np.ndarray | None:
  """A Hadamard matrix of order m by Paley's constructions, or None."""
  q = m - 1
  if _is_prime(q) and q % 4 == 3:  # Paley I: order q + 1
    chi = _residue_character(q)
    core = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    h = np.ones((m, m), np.int64)
    h[1:, 0] = -1
    h[1:, 1:] = core + np.eye(q, dtype=np.int64)
    return h
  q = m // 2 - 1
  if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: order 2 (q + 1)
    chi = _residue_character(q)
    c = np.zeros((q + 1, q + 1), np.int64)  # the symmetric conference matrix
    c[0, 1:] = c[1:, 0] = 1
    c[1:, 1:] = [[chi[(j - i) % q] for j in range(q)] for i in range(q)]
    a, b = np.array([[1, -1], [-1, -1]]), np.array([[1, 1], [1, -1]])
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)
  return None


def _residue_character(q: int) -> list[int]:
  """The quadratic character mod prime q: 0 at 0, +1 on squares, -1 elsewhere."""
  squares = {(i * i) % q for i in range(1, q)}
  return [0] + [1 if i in squares else -1 for i in range(1, q)]


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, np.ndarray]:
  """``(2^k, H_m)`` with ``n = m 2^k`` and ``H_m`` a Hadamard matrix (k largest possible)."""
  if n < 1:
    raise ValueError(f"hadamard: the order must be positive, got {n}")
  k = (n & -n).bit_length() - 1  # the power of two in n
  for kk in range(k, -1, -1):
    m = n >> kk
    if m == 1:
      return 1 << kk, np.ones((1, 1), np.int64)
    h = _paley(m)
    if h is not None:
      return 1 << kk, h
  raise ValueError(f"hadamard: no construction for order {n} here (n = m 2^k with m = 1 or a "
                   "Paley order: q + 1, q prime = 3 mod 4, or 2 (q + 1), q prime = 1 mod 4)")


def hadamard_matrix(n: int) -> np.ndarray:
  """A Hadamard matrix of order n (int entries +-1, ``H H^T = n I``): ``kron(H_m, H_{2^k})``.

  Example:
    >>> h = hadamard_matrix(12)
    >>> bool((h @ h.T == 12 * np.eye(12)).all())
    True
  """
  s, hm = _factor(n)
  sylvester = np.ones((1, 1), np.int64)
  while sylvester.shape[0] < s:
    sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
  return np.kron(hm, sylvester)


def fwht(x: Array) -> Array:
  """``x @ H / sqrt(n)`` along the last axis (``n = x.shape[-1]``, H = `hadamard_matrix`):
  butterflies for the power-of-two factor, an ``m x m`` product for the rest. Orthogonal:
  the inverse is ``y @ H^T / sqrt(n)`` (`fwht_transpose`).

  Shapes: ``[..., n] -> [..., n]`` in ``x``'s dtype (computed in float32).

  Example:
    >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0]))
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  return _transform(x, transpose=False)


def fwht_transpose(x: Array) -> Array:
  """``x @ H^T / sqrt(n)``: the inverse of `fwht` (the same for pure Sylvester orders).

  Example:
    >>> x = jnp.arange(12.0)
    >>> bool(jnp.allclose(fwht_transpose(fwht(x)), x, atol=1e-5))
    True
  """
  return _transform(x, transpose=True)


def _transform(x: Array, transpose: bool) -> Array:
  n = x.shape[-1]
  s, hm = _factor(n)
  m = n // s
  y = x.astype(jnp.float32).reshape(x.shape[:-1] + (m, s))
  h = 1
  while h < s:  # Sylvester butterflies on the last axis (symmetric: its own transpose)
    y = y.reshape(y.shape[:-1] + (s // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(x.shape[:-1] + (m, s))
    h *= 2
  if m > 1:  # x @ kron(A, B): A^T on the m axis (A for the transpose)
    a = jnp.asarray(hm, jnp.float32)
    y = jnp.einsum("...ij,ia->...aj" if not transpose else "...ij,ai->...aj", y, a)
  return (y.reshape(x.shape) / np.sqrt(n)).astype(x.dtype)


def random_hadamard(n: int, key: Array) -> Array:
  """A random orthogonal ``diag(signs) H / sqrt(n)`` (QuaRot's randomized Hadamard), float32
  (n, n): random +-1 signs on the rows of a Hadamard matrix.

  Example:
    >>> q = random_hadamard(12, jax.random.key(0))
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(12), atol=1e-6))
    True
  """
  signs = jax.random.rademacher(key, (n,), jnp.float32)
  return signs[:, None] * jnp.asarray(hadamard_matrix(n), jnp.float32) / np.sqrt(n)
