"""GPTQ on arrays (Frantar et al., 2022): the math only, no Flax.

For a linear layer ``y = x @ W`` with calibration inputs ``X`` and ``H = 2 X^T X``, GPTQ
quantizes the columns of ``W^T`` (the input features) one at a time and spreads each column's
rounding error over the not-yet-quantized columns through the inverse Hessian:

.. math::  \\delta = (w_j - q_j) / [H^{-1}]_{jj},\\qquad
           W_{:, j+1:} \\mathrel{-}= \\delta\\, [H^{-1}]_{j, j+1:}

using the upper Cholesky factor of ``H^{-1}`` and "lazy batch" updates: inside a block of
``block_size`` columns updates are rank-1, the rest of the matrix is updated once per block.
Scales are fixed up front from the original weights (per channel, or per group of input
features — GPTQ's "static groups", which keeps act-order and groups compatible).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.quant import core
from jaxcomp.quant.finite import check_finite, check_positive
from jaxcomp.quant.spec import Quant

Array = jax.Array


def hessian(x: Array) -> Array:
  """``2 X^T X`` over all leading axes of ``x`` (float32), shape (K, K).

  Example:
    >>> hessian(jnp.ones((4, 8, 3))).shape
    (3, 3)
  """
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return 2.0 * x.T @ x


def column_scales(wt: Array, spec: Quant) -> tuple[Array, Array | None]:
  """Per-(row, column) scale and zero point of ``wt`` (N, K) from its original values (GPTQ's
  static groups; also SparseGPT's joint quantization).

  Example:
    >>> s, z = column_scales(jnp.ones((4, 8)) * 7, jc.Quant(w_bits=4))
    >>> s.shape, float(s[0, 0]), z
    ((4, 8), 1.0, None)
  """
  n, k = wt.shape
  if spec.granularity == "group":  # a shorter last group is zero-padded
    g = core.pad_to_groups(wt, 1, spec.group).reshape(n, -1, spec.group)
    s, z = core.compute_scale(g, spec.w_bits, axes=2, symmetric=spec.w_symmetric,
                              calibration=spec.calibration, percentile=spec.percentile,
                              full_range=spec.full_range, fmt=spec.w_format,
                              scale_dtype=spec.scale_dtype)
    rep = lambda a: None if a is None else core.expand_groups(a[..., 0], 1, spec.group, k)
    return rep(s), rep(z)
  axes = 1 if spec.granularity == "channel" else None
  s, z = core.compute_scale(wt, spec.w_bits, axes=axes, symmetric=spec.w_symmetric,
                            calibration=spec.calibration, percentile=spec.percentile,
                            full_range=spec.full_range, fmt=spec.w_format,
                              scale_dtype=spec.scale_dtype)
  full = lambda a: None if a is None else jnp.broadcast_to(a, wt.shape)
  return full(s), full(z)


def quant_dequant(w: Array, s: Array, z: Array | None, spec: Quant) -> Array:
  """``w`` rounded onto ``spec``'s grid with scales ``s`` (and zero points ``z``), dequantized;
  all three broadcast together.

  Example:
    >>> quant_dequant(jnp.array([0.26, 9.0]), jnp.array(0.5), None, jc.Quant(w_bits=4))
    Array([0.5, 3.5], dtype=float32)
  """
  if spec.w_format != "int":  # a float format: the nearest value of its element format
    return core.grid_value(w, s, None, spec.w_bits, fmt=spec.w_format) * s
  qmin, qmax = core.qrange(spec.w_bits, spec.w_symmetric, full_range=spec.full_range)
  q = jnp.round(w / s)
  if z is None:
    return jnp.clip(q, qmin, qmax) * s
  return (jnp.clip(q + z, qmin, qmax) - z) * s


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "act_order", "keep_zeros"))
def _gptq(w: Array, h: Array, damp: Array, spec: Quant, block_size: int,
          act_order: bool, keep_zeros: bool = False) -> tuple[Array, Array]:
  wt = w.T.astype(jnp.float32)  # (N, K): columns are input features
  n, k = wt.shape
  dead = jnp.diag(h) == 0
  h = jnp.where(dead[:, None] & dead[None, :] & jnp.eye(k, dtype=bool), 1.0, h)
  wt = jnp.where(dead[None, :], 0.0, wt)
  s, z = column_scales(wt, spec)
  keep = (wt != 0) if keep_zeros else jnp.ones(wt.shape, bool)  # a pruned kernel's mask
  perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
  wt, s, keep = wt[:, perm], s[:, perm], keep[:, perm]
  z = None if z is None else z[:, perm]
  h = h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
  hinv = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper factor of H^-1
  q_out = jnp.zeros_like(wt)
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    w1, hinv1 = wt[:, i1:i2], hinv[i1:i2, i1:i2]
    s1, keep1 = s[:, i1:i2], keep[:, i1:i2]
    z1 = None if z is None else z[:, i1:i2]

    def column(i, carry, hinv1=hinv1, s1=s1, z1=z1, keep1=keep1):
      w1, q1, err1 = carry
      col = w1[:, i]
      q = quant_dequant(col, s1[:, i], None if z1 is None else z1[:, i], spec)
      q = jnp.where(keep1[:, i], q, 0.0)  # a pruned weight stays 0; its error is compensated
      e = (col - q) / hinv1[i, i]
      mask = (jnp.arange(w1.shape[1]) > i).astype(w1.dtype)
      w1 = w1 - e[:, None] * (hinv1[i] * mask)[None, :]
      return w1, q1.at[:, i].set(q), err1.at[:, i].set(e)

    zeros = jnp.zeros_like(w1)
    _, q1, err1 = jax.lax.fori_loop(0, i2 - i1, column, (w1, zeros, zeros))
    q_out = q_out.at[:, i1:i2].set(q1)
    wt = wt.at[:, i2:].add(-err1 @ hinv[i1:i2, i2:])
  inv = jnp.argsort(perm)
  zero = None if z is None else step_from_columns(z[:, inv], spec)
  return (q_out[:, inv].T.astype(w.dtype), step_from_columns(s[:, inv], spec), zero,
          jnp.all(jnp.isfinite(hinv)))


def step_from_columns(s: Array, spec: Quant) -> Array:
  """Per-(row, column) scales (N, K) -> the (K, N)-kernel step: (1, N), or (ceil(K / group), N).

  Example:
    >>> step_from_columns(jnp.ones((4, 8)), jc.Quant(w_bits=4, group=4)).shape
    (2, 4)
  """
  if spec.granularity == "group":
    return s[:, ::spec.group].T
  return s[:, :1].T


class GPTQResult(NamedTuple):
  """What `gptq` returns."""

  w_hat: Array  # (K, N) fake-quantized kernel: w_hat == (clip(round(w_hat / step) + z) - z) * step
  step: Array  # (1, N) per channel or (ceil(K / group), N) per group: the grid's scales
  damp: float  # the dampening that succeeded
  zero: Array | None = None  # asymmetric grids: integer-valued zero points shaped like step


def weight_step(w: Array, spec: Quant) -> Array:
  """The symmetric RTN step of a (K, N) kernel: (1, N) per channel, (K // group, N) per group.

  Example:
    >>> weight_step(jnp.ones((8, 4)) * 7, jc.Quant(w_bits=4))
    Array([[1., 1., 1., 1.]], dtype=float32)
  """
  s, _ = column_scales(w.T.astype(jnp.float32), spec)
  return step_from_columns(s, spec)


def gptq(w: Array, h: Array, spec: Quant, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, max_damp_raises: int = 6,
         keep_zeros: bool = False) -> GPTQResult:
  """Quantizes a (K, N) kernel with GPTQ given the (K, K) Hessian of its inputs.

  Args:
    w: kernel (K, N), ``y = x @ w``.
    h: ``hessian(x)`` of the calibration inputs, (K, K).
    spec: a `jaxcomp.Quant` (``w_bits``, channel/group granularity, symmetry, calibration).
    block_size: columns per lazy-update block.
    damp: dampening, as a fraction of ``mean(diag(H))`` added to the diagonal.
    act_order: quantize input features in order of decreasing ``diag(H)``.
    max_damp_raises: when ``H`` is not positive definite (the Cholesky factor is not finite),
      retry with 10x the dampening, at most this many times.
    keep_zeros: the exact zeros of ``w`` (a pruned kernel's mask) stay zero; their share of
      the error is compensated by the kept weights, as SparseGPT does for its own mask.

  Returns:
    A `GPTQResult` ``(w_hat, step, damp)``: the fake-quantized kernel (K, N) on ``spec``'s
    grid, its step (``(1, N)`` or ``(K // group, N)``), and the dampening that succeeded.

  Raises:
    ValueError: ``damp`` is not a finite number > 0; ``w`` or ``h`` holds a NaN or inf (the
      message names the input and the first bad index: a non-finite input is refused, not
      solved into NaNs nor blamed on the Hessian's definiteness); ``H`` is not positive
      definite even after ``max_damp_raises`` raises.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (256, 32))
    >>> w = jax.random.normal(jax.random.key(1), (32, 16))
    >>> w_hat, step, _, _ = gptq(w, hessian(x), jc.Quant(w_bits=4))
    >>> w_hat.shape
    (32, 16)
    >>> gptq(w.at[3, 4].set(jnp.nan), hessian(x), jc.Quant(w_bits=4))
    Traceback (most recent call last):
    ...
    ValueError: gptq: the kernel w has a non-finite value (nan) at index (3, 4); gptq refuses non-finite inputs
  """
  check_positive("gptq", "damp", damp)
  if spec.granularity == "group" and w.shape[0] % spec.group and spec.calibration != "absmax":
    raise ValueError(f"Quant.group={spec.group} does not divide the input size {w.shape[0]} "
                     "(a shorter last group needs calibration='absmax')")
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"gptq: Hessian shape {h.shape} does not match kernel {w.shape}")
  check_finite([("gptq: the kernel w", w), ("gptq: the Hessian h", h)],
               refuses="gptq refuses non-finite inputs")
  for _ in range(max_damp_raises + 1):
    w_hat, step, zero, ok = _gptq(w, h, jnp.float32(damp), spec, block_size, act_order,
                                  keep_zeros)
    if bool(ok):
      return GPTQResult(w_hat, step, damp, zero)
    damp *= 10.0
  raise ValueError(f"gptq: Hessian not positive definite even with dampening {damp / 10:g}")


def rtn(w: Array, spec: Quant) -> Array:
  """Round-to-nearest baseline on the same grid and scales as `gptq` (per channel/group).

  Non-finite values propagate, never hide: a NaN or +-inf in ``w`` makes the scale of its
  output channel (per channel), of its group of input features (per group) or of the tensor
  NaN, so every element sharing that scale comes out NaN (``w[:, n]`` per channel;
  ``w[g * group:(g + 1) * group, n]`` per group); everything else is unchanged.

  Args:
    w: kernel (K, N).
    spec: a `jaxcomp.Quant` (``w_bits``, granularity, symmetry, calibration).

  Returns:
    The fake-quantized kernel (K, N), dtype of ``w``.

  Example:
    >>> rtn(jnp.ones((8, 4)), jc.Quant(w_bits=4)).shape
    (8, 4)
    >>> bool(jnp.isnan(rtn(jnp.ones((8, 4)).at[2, 1].set(jnp.inf), jc.Quant(w_bits=4))[:, 1]).all())
    True
  """
  wt = w.T.astype(jnp.float32)
  s, z = column_scales(wt, spec)
  return quant_dequant(wt, s, z, spec).T.astype(w.dtype)


def output_error(x: Array, w: Array, w_hat: Array) -> float:
  """``||x w - x w_hat||_F^2 / ||x w||_F^2`` (relative squared layer-output error)."""
  x = x.reshape(-1, x.shape[-1])
  ref = x @ w
  return float(jnp.sum(jnp.square(ref - x @ w_hat)) / jnp.sum(jnp.square(ref)))


