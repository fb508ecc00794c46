"""AWQ on arrays (Lin et al., 2023, arXiv 2306.00978): the math only, no Flax.

Activation-aware weight quantization protects the weights of *salient* input features (those
with large activations) by scaling them up before rounding and folding the inverse scale into
the input: for ``y = x @ W`` with a per-input-feature ``s > 0``,

.. math::  y = (x / s) \\, (s \\odot_{rows} W) \\approx (x / s) \\, Q(s \\odot_{rows} W)

which is exact before rounding. ``s = mean|x|^\\alpha`` (normalised so that
``max(s) min(s) = 1``), with ``alpha`` grid-searched to minimise the layer's output error on
the calibration set. That error is computed exactly from the Hessian ``H = 2 X^T X`` alone
(`jaxcomp.quantizers.gptq_core.hessian`): with ``W_eff = Q(s W) / s`` and ``D = W_eff - W``,

.. math::  \\|X W_{eff} - X W\\|_F^2 = tr(D^T H D) / 2.

``alpha = 0`` gives ``s = 1``, i.e. plain round-to-nearest, so the search never does worse
than RTN on the calibration set. `awq_clip` is AWQ's second step: shrink the quantization
range per output channel (and group) over a grid, judged by the same error.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quantizers.gptq_core import rtn
from jaxcomp.quant import core
from jaxcomp.quant.spec import Quant

Array = jax.Array

_rtn = jax.jit(rtn, static_argnames=("spec",))

# Smallest scale, relative to the largest, before normalisation (AWQ clamps at 1e-4).
_FLOOR = 1e-4
# Grid points are evaluated in batches of about this many kernel-sized elements.
_BATCH_ELEMENTS = 2**25


def _check(fn: str, w: Array, h: Array, mean_abs: Array | None, spec: Quant,
           n_grid: int) -> None:
  if w.ndim != 2:
    raise ValueError(f"{fn}: w must be a (K, N) kernel, got shape {w.shape}")
  k = w.shape[0]
  if h.shape != (k, k):
    raise ValueError(
        f"{fn}: h must have shape (K, K) = {(k, k)} to match w of shape {w.shape}, "
        f"got {h.shape}")
  if mean_abs is not None and mean_abs.shape != (k,):
    raise ValueError(
        f"{fn}: mean_abs must have shape (K,) = {(k,)} to match w of shape {w.shape}, "
        f"got {mean_abs.shape}")
  if not isinstance(spec, Quant):
    raise ValueError(f"{fn}: spec must be a jaxcomp.Quant, got {type(spec).__name__}")
  if spec.granularity == "group" and k % spec.group and (
      fn == "awq_clip" or spec.calibration != "absmax"):
    raise ValueError(f"{fn}: Quant.group={spec.group} does not divide the input size {k}")
  if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
    raise ValueError(f"{fn}: n_grid must be a positive int, got {n_grid!r}")


def normalised_scales(mean_abs: Array, alpha: float | Array) -> Array:
  """AWQ's smoothing vector ``s = mean_abs^alpha / sqrt(max(s) min(s))``, float32 (K,).

  ``mean_abs`` is first divided by its largest value and the power clamped at 1e-4, so the
  result does not depend on the scale of ``mean_abs``. Dead input features
  (``mean_abs == 0``) get ``s = 1`` and take no part in the normalisation; if all are dead,
  ``s = 1``.

  Args:
    mean_abs: ``mean |x_j|`` over calibration tokens, (K,), >= 0.
    alpha: exponent in [0, 1]; 0 gives ``s = 1``.

  Returns:
    ``s``, float32 (K,), positive.

  Example:
    >>> normalised_scales(jnp.array([1.0, 4.0, 0.0]), 0.5)
    Array([0.70710677, 1.4142135 , 1.        ], dtype=float32)
  """
  m = jnp.asarray(mean_abs, jnp.float32)
  live = m > 0
  any_live = jnp.any(live)
  m = m / jnp.where(any_live, jnp.max(jnp.where(live, m, 0.0)), 1.0)
  s = jnp.maximum(jnp.where(live, m, 1.0) ** alpha, _FLOOR)
  hi = jnp.where(any_live, jnp.max(jnp.where(live, s, 0.0)), 1.0)
  lo = jnp.where(any_live, jnp.min(jnp.where(live, s, jnp.inf)), 1.0)
  return jnp.where(live, s / jnp.sqrt(hi * lo), 1.0)


def h_error(w: Array, w_hat: Array, h: Array) -> Array:
  """``tr(D^T H D) / 2``, ``D = w_hat - w``: ``||x w_hat - x w||_F^2`` when ``H = hessian(x)``.

  Args:
    w, w_hat: kernels (K, N).
    h: ``hessian(x)``, (K, K).

  Returns:
    float32 scalar.

  Example:
    >>> x = jnp.array([[1.0, 2.0]])
    >>> w, w_hat = jnp.array([[1.0], [1.0]]), jnp.array([[1.0], [1.5]])
    >>> h_error(w, w_hat, 2.0 * x.T @ x)      # (x @ (w_hat - w))^2 = 1.0
    Array(1., dtype=float32)
  """
  dt = (w_hat - w).astype(jnp.float32).T  # (N, K): a faster layout for XLA's CPU dot
  return 0.5 * jnp.sum(dt * (dt @ h.astype(jnp.float32)))


def _batch(n_grid: int, w: Array) -> int:
  """Grid points evaluated at once: about 2^25 kernel-sized elements live at a time."""
  return max(1, min(n_grid, _BATCH_ELEMENTS // w.size))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _search(w: Array, h: Array, mean_abs: Array, spec: Quant, n_grid: int):
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)

  def error(alpha):
    s = normalised_scales(mean_abs, alpha)[:, None]
    return h_error(w, rtn(s * w, spec) / s, h)

  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
  errs = jax.lax.map(error, alphas, batch_size=_batch(n_grid, w))
  best = jnp.argmin(errs)  # the first minimum: the smallest alpha among ties
  return normalised_scales(mean_abs, alphas[best]), alphas[best], errs


def awq_scales(w: Array, h: Array, mean_abs: Array, spec: Quant, *,
               n_grid: int = 20) -> tuple[Array, dict[str, Any]]:
  """AWQ's per-input-feature scale: grid search of ``alpha`` judged by the exact layer error.

  Tries ``alpha`` in ``{0, 1/n_grid, ..., (n_grid - 1)/n_grid}``, ``s = normalised_scales(
  mean_abs, alpha)``, and keeps the ``alpha`` minimising ``||X (Q(s W)/s - W)||_F^2``, computed
  from ``h`` (`h_error`). ``Q`` is `jaxcomp.quantizers.gptq_core.rtn` on ``spec``'s grid (scales from
  the scaled weights, per channel or group). The search costs ``n_grid`` (K, K) @ (K, N)
  matmuls.

  Args:
    w: kernel (K, N), ``y = x @ w``.
    h: ``hessian(x)`` of the calibration inputs, (K, K).
    mean_abs: ``mean |x_j|`` over the calibration tokens, (K,).
    spec: a `jaxcomp.Quant` (``w_bits``, granularity, symmetry, calibration).
    n_grid: number of ``alpha`` values tried.

  Returns:
    ``(s, info)``: ``s`` float32 (K,), positive; ``info`` a dict with ``alpha`` (float, the
    chosen exponent), ``error`` (its ``||X (W_eff - W)||_F^2``), ``rtn_error`` (the same at
    ``alpha = 0``: plain RTN) and ``errors`` (numpy (n_grid,), per ``alpha``).

  Raises:
    ValueError: ``w`` not 2-D, ``h`` not (K, K), ``mean_abs`` not (K,), ``group`` not dividing
      K, or ``n_grid < 1``; the message names the argument.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (256, 32)) * jnp.arange(1.0, 33.0)
    >>> w = jax.random.normal(jax.random.key(1), (32, 16))
    >>> h = 2.0 * x.T @ x
    >>> s, info = awq_scales(w, h, jnp.mean(jnp.abs(x), 0), jc.Quant(w_bits=4))
    >>> s.shape, bool(info["error"] <= info["rtn_error"])
    ((32,), True)
  """
  _check("awq_scales", w, h, mean_abs, spec, n_grid)
  s, _, errs = _search(w, h, jnp.asarray(mean_abs), spec, n_grid)
  errs = np.asarray(errs)
  best = int(np.argmin(errs))
  info = {"alpha": best / n_grid, "error": float(errs[best]), "rtn_error": float(errs[0]),
          "errors": errs}
  return s, info


def _clip_ranges(w: Array, spec: Quant) -> tuple[Array, Array, Array]:
  """``w`` (K, N) as (G, K/G, N) with the (lo, hi) of each quantization slice (keepdims)."""
  k, n = w.shape
  if spec.granularity == "group":
    wg = w.reshape(k // spec.group, spec.group, n)
    axes = (1,)
  else:
    wg = w.reshape(1, k, n)
    axes = (1,) if spec.granularity == "channel" else (0, 1, 2)
  if spec.w_symmetric:
    hi = jnp.max(jnp.abs(wg), axis=axes, keepdims=True)
    return wg, -hi, hi
  lo = jnp.minimum(jnp.min(wg, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(wg, axis=axes, keepdims=True), 0.0)
  return wg, lo, hi


def _clip_quant(wg: Array, lo: Array, hi: Array, ratio: Array, spec: Quant) -> Array:
  s, z = core.scale_from_range(lo * ratio, hi * ratio, spec.w_bits, spec.w_symmetric,
                               scale_dtype=spec.scale_dtype)
  return core.fake_quant_with_scale(wg, s, z, spec.w_bits, spec.w_symmetric)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _clip(w: Array, h: Array, max_shrink: Array, spec: Quant, n_grid: int):
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  wg, lo, hi = _clip_ranges(w, spec)
  g, gs, n = wg.shape
  if spec.granularity == "group":  # AWQ: each group judged by its own block of H
    hb = jnp.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])
    slice_err = lambda d: jnp.sum(d * jnp.einsum("gij,gjn->gin", hb, d), axis=1, keepdims=True)
  else:  # exact: the layer error is a sum over output channels
    def slice_err(d):
      dt = d.reshape(gs, n).T
      per_channel = jnp.sum(dt * (dt @ h), axis=1).reshape(1, 1, n)
      return per_channel if spec.granularity == "channel" else jnp.sum(per_channel, keepdims=True)

  ratios = 1.0 - max_shrink * jnp.arange(n_grid, dtype=jnp.float32) / n_grid
  errs = jax.lax.map(lambda r: slice_err(_clip_quant(wg, lo, hi, r, spec) - wg), ratios,
                     batch_size=_batch(n_grid, w))
  ratio = ratios[jnp.argmin(errs, axis=0)]  # per slice; the first (largest ratio) among ties
  return _clip_quant(wg, lo, hi, ratio, spec).reshape(w.shape), ratio


def awq_clip(w: Array, h: Array, spec: Quant, *, n_grid: int = 20,
             max_shrink: float = 0.5) -> tuple[Array, Array]:
  """AWQ's clipping search: shrink each slice's quantization range, judged by the layer error.

  For each ratio ``r`` in ``{1, 1 - max_shrink/n_grid, ..., 1 - max_shrink (n_grid-1)/n_grid}``
  the absmax range of every quantization slice (output channel, group of input features within
  an output channel, or the whole tensor, per ``spec.granularity``) is scaled by ``r`` and the
  kernel rounded on that grid; each slice keeps the ratio with the smallest error
  ``d^T H d / 2``. Per channel and per tensor that is the exact layer error (it is a sum over
  output channels); per group it uses the group's diagonal block of ``H``, as AWQ does (it
  judges each group on its own inputs). ``r = 1`` is absmax RTN, so per channel or tensor the
  result is never worse than absmax RTN on the calibration set. ``spec.calibration`` is not
  used: the search starts from the absmax range.

  To clip after `awq_scales`, pass the scaled kernel ``s[:, None] * w`` and the Hessian of the
  scaled inputs ``h / (s[:, None] * s[None, :])`` (or use ``awq(..., clip=True)``).

  Args:
    w: kernel (K, N).
    h: ``hessian(x)`` of its inputs, (K, K).
    spec: a `jaxcomp.Quant`.
    n_grid: number of ratios tried.
    max_shrink: the smallest ratio tried is ``1 - max_shrink (n_grid - 1) / n_grid``; in [0, 1).

  Returns:
    ``(w_hat, ratio)``: the fake-quantized kernel (K, N) (w's dtype) and the chosen ratio per
    slice, float32 (G, 1, N) per group (G = K / group), (1, 1, N) per channel, (1, 1, 1) per
    tensor.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (256, 32))
    >>> w = jax.random.normal(jax.random.key(1), (32, 16))
    >>> w_hat, ratio = awq_clip(w, 2.0 * x.T @ x, jc.Quant(w_bits=3))
    >>> w_hat.shape, ratio.shape, bool(jnp.all(ratio <= 1.0))
    ((32, 16), (1, 1, 16), True)
  """
  _check("awq_clip", w, h, None, spec, n_grid)
  if not 0.0 <= max_shrink < 1.0:
    raise ValueError(f"awq_clip: max_shrink must be in [0, 1), got {max_shrink!r}")
  w_hat, ratio = _clip(w, h, jnp.float32(max_shrink), spec, n_grid)
  return w_hat.astype(w.dtype), ratio


def awq(w: Array, h: Array, mean_abs: Array, spec: Quant, *, n_grid: int = 20,
        clip: bool = False, clip_grid: int = 20,
        max_shrink: float = 0.5) -> tuple[Array, Array]:
  """AWQ: the fake-quantized *scaled* kernel ``Q(s[:, None] * w)`` and the scale ``s``.

  The quantized layer is ``(x / s) @ w_hat_scaled``; fold ``1 / s`` into whatever produces
  ``x`` (a preceding norm's gain, or the previous linear layer's output channels).

  Args:
    w: kernel (K, N).
    h: ``hessian(x)``, (K, K).
    mean_abs: ``mean |x_j|`` over the calibration tokens, (K,).
    spec: a `jaxcomp.Quant`.
    n_grid: ``alpha`` grid of `awq_scales`.
    clip: then run `awq_clip` on the scaled kernel (with the scaled inputs' Hessian) instead
      of plain RTN.
    clip_grid, max_shrink: `awq_clip`'s ``n_grid`` and ``max_shrink``.

  Returns:
    ``(w_hat_scaled, s)``: (K, N) in w's dtype, on ``spec``'s grid; float32 (K,).

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (256, 32)) * jnp.arange(1.0, 33.0)
    >>> w = jax.random.normal(jax.random.key(1), (32, 16))
    >>> w_hat, s = awq(w, 2.0 * x.T @ x, jnp.mean(jnp.abs(x), 0), jc.Quant(w_bits=4))
    >>> y = (x / s) @ w_hat                    # the quantized layer
    >>> y.shape
    (256, 16)
  """
  s, _ = awq_scales(w, h, mean_abs, spec, n_grid=n_grid)
  ws = s[:, None] * w.astype(jnp.float32)
  if clip:
    hs = h.astype(jnp.float32) / (s[:, None] * s[None, :])
    w_hat, _ = awq_clip(ws, hs, spec, n_grid=clip_grid, max_shrink=max_shrink)
  else:
    w_hat = _rtn(ws, spec)
  return w_hat.astype(w.dtype), s
