"""SparseGPT on arrays (Frantar & Alistarh, 2023, https://arxiv.org/abs/2301.00774): the math only.

One-shot pruning with reconstruction, on the same Hessian ``H = 2 X^T X`` and inverse-Hessian
Cholesky machinery as GPTQ (`gptq_core`). Columns of ``W^T`` (input features) are visited in
order; a pruned (and, jointly, a quantized) column's error is spread over the columns not yet
visited, so the kept weights absorb what the pruned ones did:

.. math::  \\delta = (w_j - m_j \\odot q(w_j)) / [H^{-1}]_{jj},\\qquad
           W_{:, j+1:} \\mathrel{-}= \\delta\\, [H^{-1}]_{j, j+1:}

The mask is chosen adaptively, block by block (128 columns), from the OBS saliency
``w^2 / [H^{-1}]_{jj}^2`` of the *updated* weights: for unstructured sparsity the lowest
saliencies of the whole block are pruned (block counts add up to exactly
``round(sparsity * K * N)``); for N:M, each run of M columns is decided when the loop reaches
it, keeping the N most salient weights of every row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.quantizers import gptq_core
from jaxcomp.quant.finite import check_finite, check_positive
from jaxcomp.quant.spec import Quant

Array = jax.Array


class SparseGPTResult(NamedTuple):
  """What `sparsegpt` returns."""

  w_hat: Array  # (K, N) pruned (and, with a spec, fake-quantized) kernel; 0 where pruned
  mask: Array  # bool (K, N), True = kept
  step: Array | None  # with a spec: (1, N) or (K // group, N), the grid's scales
  damp: float  # the dampening that succeeded


def _rank_keep(scores: Array, n_pruned: Array | int) -> Array:
  """Keeps all but the ``n_pruned`` lowest entries of each row of a 2-D ``scores``."""
  rank = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
  return rank >= n_pruned


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "spec", "block_size"))
def _sparsegpt(w: Array, h: Array, damp: Array, sparsity: float, nm: tuple[int, int] | None,
               spec: Quant | None, block_size: int) -> tuple[Array, Array, Array | None, Array]:
  wt = w.T.astype(jnp.float32)  # (N, K)
  n_out, k = wt.shape
  dead = jnp.diag(h) == 0
  h = jnp.where(dead[:, None] & dead[None, :] & jnp.eye(k, dtype=bool), 1.0, h)
  wt = jnp.where(dead[None, :], 0.0, wt)
  s, z = gptq_core.column_scales(wt, spec) if spec is not None else (None, None)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
  hinv = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper factor of H^-1
  total_pruned = lambda cols: round(sparsity * n_out * cols)  # cumulative: exact in total
  q_out, mask_out = jnp.zeros_like(wt), jnp.ones(wt.shape, bool)
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    w1, hinv1 = wt[:, i1:i2], hinv[i1:i2, i1:i2]
    d = jnp.diag(hinv1)
    if nm is None:
      saliency = jnp.square(w1) / jnp.square(d)[None, :]
      n_pruned = total_pruned(i2) - total_pruned(i1)
      mask1 = _rank_keep(saliency.reshape(1, -1), n_pruned).reshape(w1.shape)
    else:
      mask1 = jnp.ones(w1.shape, bool)
    s1 = None if s is None else s[:, i1:i2]
    z1 = None if z is None else z[:, i1:i2]

    def column(i, carry, hinv1=hinv1, d=d, s1=s1, z1=z1):
      w1, q1, err1, mask1 = carry
      if nm is not None:  # entering a run of M columns: keep the N most salient per row
        n_keep, m = nm
        cols = jax.lax.dynamic_slice_in_dim(w1, i, m, axis=1)
        dd = jax.lax.dynamic_slice_in_dim(d, i, m)
        keep = _rank_keep(jnp.square(cols) / jnp.square(dd)[None, :], m - n_keep)
        updated = jax.lax.dynamic_update_slice_in_dim(mask1, keep, i, axis=1)
        mask1 = jnp.where(i % m == 0, updated, mask1)
      col, keep_col = w1[:, i], mask1[:, i]
      q = jnp.where(keep_col, col, 0.0)
      if spec is not None:
        q = jnp.where(keep_col, gptq_core.quant_dequant(
            q, s1[:, i], None if z1 is None else z1[:, i], spec), 0.0)
      e = (col - q) / d[i]
      later = (jnp.arange(w1.shape[1]) > i).astype(w1.dtype)
      w1 = w1 - e[:, None] * (hinv1[i] * later)[None, :]
      return w1, q1.at[:, i].set(q), err1.at[:, i].set(e), mask1

    zeros = jnp.zeros_like(w1)
    _, q1, err1, mask1 = jax.lax.fori_loop(0, i2 - i1, column, (w1, zeros, zeros, mask1))
    q_out = q_out.at[:, i1:i2].set(q1)
    mask_out = mask_out.at[:, i1:i2].set(mask1)
    wt = wt.at[:, i2:].add(-err1 @ hinv[i1:i2, i2:])
  step = None if spec is None else gptq_core.step_from_columns(s, spec)
  return q_out.T.astype(w.dtype), mask_out.T, step, jnp.all(jnp.isfinite(hinv))


def sparsegpt(w: Array, h: Array, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
              spec: Quant | None = None, block_size: int = 128, damp: float = 0.01,
              max_damp_raises: int = 6) -> SparseGPTResult:
  """Prunes (and optionally quantizes) a (K, N) kernel with SparseGPT given its inputs' Hessian.

  Args:
    w: kernel ``(K, N)``, ``y = x @ w``.
    h: ``hessian(x)`` of the calibration inputs, ``(K, K)``.
    sparsity: unstructured: fraction pruned, in ``[0, 1)``; exactly ``round(sparsity * K * N)``
      weights end up zero. Ignored when ``nm`` is given.
    nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs in each output column (2:4);
      ``K`` and ``block_size`` must be multiples of ``m``.
    spec: a weight `jaxcomp.Quant` (channel/group): prune and quantize jointly (the kept
      weights land on GPTQ's static grid, pruned ones are 0).
    block_size: columns per lazy-update (and mask-selection) block.
    damp: dampening, as a fraction of ``mean(diag(H))``, > 0; raised x10 when ``H`` is not
      positive definite, at most ``max_damp_raises`` times.

  Returns:
    `SparseGPTResult` ``(w_hat, mask, step, damp)``.

  Raises:
    ValueError: ``damp`` <= 0, a NaN or inf in ``w`` or ``h`` (named, with its first index),
      bad shapes or patterns, or ``H`` not positive definite after every raise.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (256, 32))
    >>> w = jax.random.normal(jax.random.key(1), (32, 16))
    >>> r = sparsegpt(w, gptq_core.hessian(x), nm=(2, 4))
    >>> int(r.mask.sum()), bool(jnp.all(r.w_hat[~r.mask] == 0))
    (256, True)
  """
  k = w.shape[0]
  check_positive("sparsegpt", "damp", damp)
  if w.ndim != 2:
    raise ValueError(f"sparsegpt: kernel must be 2-D (K, N), got shape {w.shape}")
  if h.shape != (k, k):
    raise ValueError(f"sparsegpt: Hessian shape {h.shape} does not match kernel {w.shape}")
  check_finite([("sparsegpt: the kernel w", w), ("sparsegpt: the Hessian h", h)],
               refuses="sparsegpt refuses non-finite inputs")
  if nm is None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
        0.0 <= sparsity < 1.0):
      raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
  else:
    n, m = nm
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
      raise ValueError(f"N:M sparsity needs ints 0 < N <= M, got N={n}, M={m}")
    if k % m or block_size % m:
      raise ValueError(f"N:M sparsity: the input size {k} and block_size {block_size} must be "
                       f"multiples of M={m}")
  if spec is not None and spec.granularity == "group" and k % spec.group and (
      spec.calibration != "absmax"):
    raise ValueError(f"Quant.group={spec.group} does not divide the input size {k} "
                     "(a shorter last group needs calibration='absmax')")
  for _ in range(max_damp_raises + 1):
    w_hat, mask, step, ok = _sparsegpt(w, h, jnp.float32(damp), float(sparsity),
                                       None if nm is None else tuple(nm), spec, block_size)
    if bool(ok):
      return SparseGPTResult(w_hat, mask, step, damp)
    damp *= 10.0
  raise ValueError(f"sparsegpt: Hessian not positive definite even with dampening {damp / 10:g}")
