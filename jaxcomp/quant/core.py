"""Quantization numerics on plain arrays: ranges, scales, quantize/dequantize, STE, LSQ.

Conventions used throughout (and by `jaxcomp.quant.dot`):

* A b-bit symmetric grid is the narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (so int8 is
  [-127, 127] and negation is exact); an asymmetric grid is the full signed range
  ``[-2^(b-1), 2^(b-1) - 1]`` with a zero point ``z``. Both fit in int8 for b <= 8.
* ``x_hat = (q - z) * s`` with ``q = clip(round(x / s) + z, qmin, qmax)``.
* Scales are reduced over ``axes`` with ``keepdims=True`` so they broadcast against ``x``.
* Non-finite values propagate, never hide: a NaN or +-inf in ``x`` never becomes a finite value
  on the grid. A calibrated scale (absmax, percentile, mse) of a slice holding one is NaN, and
  every element sharing that scale comes out NaN; with a given scale (a learned LSQ step) the
  non-finite element itself comes out NaN. A zero scale (an all-zero slice) is replaced by 1;
  a NaN scale is kept (never replaced by 1).

Nothing here imports flax: these are the functions another codebase may want on their own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant import formats

Array = jax.Array
Axes = int | Sequence[int] | None

# Clipping ratios tried by the MSE scale search (fraction of the absmax range).
_MSE_GRID = 20
_MSE_MIN_RATIO = 0.5


def qrange(bits: int, symmetric: bool = True, *, full_range: bool = False) -> tuple[int, int]:
  """The integer range ``(qmin, qmax)`` of a ``bits``-bit grid.

  ``full_range`` makes a symmetric grid use the whole signed range ``[-2^(b-1), 2^(b-1) - 1]``
  (16 levels at 4 bits, GPTQ's reference grid and Qwix's) instead of the narrow one.

  Example:
    >>> qrange(8), qrange(4, symmetric=False), qrange(4, full_range=True)
    ((-127, 127), (-8, 7), (-8, 7))
  """
  if symmetric and not full_range:
    q = 2 ** (bits - 1) - 1
    return -q, q
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _axes(x: Array, axes: Axes) -> tuple[int, ...]:
  if axes is None:
    return tuple(range(x.ndim))
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(a % x.ndim for a in axes)


def round_ste(x: Array) -> Array:
  """``round(x)`` in the forward pass, identity in the backward pass (straight-through).

  Example:
    >>> jax.grad(lambda x: round_ste(x).sum())(jnp.array([0.3, 1.7]))
    Array([1., 1.], dtype=float32)
  """
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def grad_scale(x: Array, g: float | Array) -> Array:
  """Identity in the forward pass; multiplies the incoming gradient by ``g`` (LSQ's trick).

  Example:
    >>> jax.grad(lambda s: grad_scale(s, 0.5) * 3.0)(2.0)
    Array(1.5, dtype=float32)
  """
  return _grad_scale(x, jnp.asarray(g, jnp.result_type(x)))


@jax.custom_vjp
def _grad_scale(x: Array, g: Array) -> Array:
  return x  # exactly x: a packed model rebuilt from the step matches bit for bit


_grad_scale.defvjp(lambda x, g: (x, g), lambda g, ct: (ct * g, jnp.zeros_like(g)))


def pad_to_groups(x: Array, axis: int, group: int) -> Array:
  """Zero-pads ``axis`` of ``x`` to a multiple of ``group`` (a shorter last group).

  Zeros change neither an absmax scale nor a dot product.

  Example:
    >>> pad_to_groups(jnp.ones((2, 5)), 1, 4).shape
    (2, 8)
  """
  axis = axis % x.ndim
  extra = -x.shape[axis] % group
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def expand_groups(s: Array, axis: int, group: int, size: int) -> Array:
  """Repeats each group's entry of ``s`` ``group`` times along ``axis``, cut to ``size``.

  Example:
    >>> expand_groups(jnp.array([[1.0, 2.0]]), 1, 3, 5)
    Array([[1., 1., 1., 2., 2.]], dtype=float32)
  """
  return jax.lax.slice_in_dim(jnp.repeat(s, group, axis=axis), 0, size, axis=axis % s.ndim)


def _safe(s: Array) -> Array:
  """A zero (or negative) scale becomes 1; NaN and inf are kept, so they propagate."""
  return jnp.where(s <= 0, jnp.ones_like(s), s)


def _range_bounds(
    x: Array, axes: tuple[int, ...], symmetric: bool, calibration: str, percentile: float
) -> tuple[Array, Array]:
  """(lo, hi) of the float range to map onto the grid, reduced over ``axes`` (keepdims).

  A slice holding a NaN or +-inf gets NaN bounds (so a NaN scale and zero point). Set
  explicitly: XLA's max-reductions need not propagate NaN (on CPU, a row reduction skips it),
  a percentile may clip an inf away, and an inf bound would give an inf scale instead."""
  if calibration == "percentile" and percentile < 100.0:
    bad = ~jnp.all(jnp.isfinite(x), axis=axes, keepdims=True)
    if symmetric:
      hi = jnp.percentile(jnp.abs(x), percentile, axis=axes, keepdims=True)
      lo = -hi
    else:
      lo = jnp.percentile(x, 100.0 - percentile, axis=axes, keepdims=True)
      hi = jnp.percentile(x, percentile, axis=axes, keepdims=True)
  else:
    # A non-finite element becomes an infinite bound inside the one reduction (a separate
    # isfinite reduction is a pass of its own on TPU), and the infinite bound is then poisoned.
    finite = jnp.isfinite(x)
    if symmetric:
      hi = jnp.max(jnp.where(finite, jnp.abs(x), jnp.inf), axis=axes, keepdims=True)
      lo = -hi
      bad = jnp.isinf(hi)
    else:
      lo = jnp.min(jnp.where(finite, x, -jnp.inf), axis=axes, keepdims=True)
      hi = jnp.max(jnp.where(finite, x, jnp.inf), axis=axes, keepdims=True)
      bad = jnp.isinf(lo) | jnp.isinf(hi)
  # The range always holds 0 so that zero (padding, ReLU outputs) is exact.
  poison = lambda b: jnp.where(bad, jnp.nan, b)
  return poison(jnp.minimum(lo, 0.0)), poison(jnp.maximum(hi, 0.0))


def round_scale_up(s: Array, dtype: str = "float32") -> Array:
  """``s`` (float32) rounded up to the nearest value of ``dtype`` ("float32": unchanged), as
  float32. Rounding up keeps ``|x| / s`` within the grid for a scale calibrated from ``x``.
  NaN stays NaN.

  Example:
    >>> round_scale_up(jnp.array([1.001, 0.5]), "bfloat16")
    Array([1.0078125, 0.5      ], dtype=float32)
  """
  if dtype == "float32":
    return s
  dt = jnp.dtype(dtype)
  t = s.astype(dt)
  t = jnp.where(t.astype(jnp.float32) < s, jnp.nextafter(t, jnp.array(jnp.inf, dt)), t)
  return t.astype(jnp.float32)


def scale_from_range(
    lo: Array, hi: Array, bits: int, symmetric: bool = True, *, full_range: bool = False,
    scale_dtype: str = "float32"
) -> tuple[Array, Array | None]:
  """Scale (and zero point, if asymmetric) mapping ``[lo, hi]`` onto the ``bits`` grid.

  Args:
    lo, hi: range bounds, broadcast-compatible (``lo <= 0 <= hi``).
    bits: grid width.
    symmetric: symmetric grid (``hi`` alone sets the scale; no zero point).
    full_range: symmetric only: the full signed grid, ``s = absmax / (2^(b-1) - 1/2)`` (so
      ``+absmax`` rounds to ``qmax`` and ``-absmax`` to ``qmin``, as in GPTQ's reference).
    scale_dtype: the scale is rounded up to this dtype (`round_scale_up`), the zero point
      computed from the rounded scale.

  Returns:
    ``(scale, zero_point)``; ``zero_point`` is None when symmetric, else float, integer-valued.

  Example:
    >>> s, z = scale_from_range(jnp.array(-1.0), jnp.array(3.0), 8, symmetric=False)
    >>> round(float(s) * 255, 4), float(z)
    (4.0, -64.0)
  """
  qmin, qmax = qrange(bits, symmetric, full_range=full_range)
  if symmetric:
    s = _safe(jnp.maximum(-lo, hi) / (qmax + 0.5 if full_range else qmax))
    return round_scale_up(s, scale_dtype), None
  s = round_scale_up(_safe((hi - lo) / (qmax - qmin)), scale_dtype)
  z = jnp.clip(jnp.round(qmin - lo / s), qmin, qmax)
  return s, z


def compute_scale(
    x: Array,
    bits: int,
    *,
    axes: Axes = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    full_range: bool = False,
    fmt: str = "int",
    scale_dtype: str = "float32",
) -> tuple[Array, Array | None]:
  """Chooses the quantization scale of ``x``, reduced over ``axes`` (kept as size-1 dims).

  ``absmax`` maps the extreme value onto the grid's edge; ``percentile`` clips at the given
  percentile of ``|x|`` (of ``x`` on both sides when asymmetric); ``mse`` searches clipping
  ratios in [0.5, 1] of the absmax range and keeps, per output slice, the one minimising
  :math:`\\sum (\\hat x - x)^2` over ``axes``.

  Args:
    x: float array of any shape.
    bits: grid width, 2..8.
    axes: axes reduced into one scale (None: the whole tensor). E.g. for a (K, N) kernel,
      ``axes=0`` gives one scale per output channel, shape (1, N).
    symmetric, calibration, percentile: as in `jaxcomp.Quant`.
    fmt: the element format (`jaxcomp.Quant.w_format`): "int" (the ``bits`` grid) or a float
      format ("e4m3", "e5m2", "mxfp4", "nvfp4"; absmax only, `formats.format_scale`).
    scale_dtype: round the scale up to this dtype (`jaxcomp.Quant.scale_dtype`).

  Returns:
    ``(scale, zero_point)`` with the shape of ``x`` reduced over ``axes`` (keepdims);
    zero_point is None when symmetric. A slice holding a NaN or +-inf gets a NaN scale (and
    zero point): non-finite values propagate, never hide. An all-zero slice gets scale 1.

  Example:
    >>> w = jnp.array([[1.0, -4.0], [2.0, 0.5]])
    >>> s, _ = compute_scale(w, 8, axes=0)
    >>> s.shape, round(float(s[0, 1]) * 127, 4)
    ((1, 2), 4.0)
  """
  return _compute_scale(x, bits, _axes(x, axes), symmetric, calibration, float(percentile),
                        full_range, fmt, scale_dtype)


# One program per shape and settings: called eagerly (RTN, convert, a model run outside jit)
# its ops would each compile per shape; inside a traced function it inlines as before.
@functools.partial(jax.jit, static_argnums=tuple(range(1, 9)))
def _compute_scale(x: Array, bits: int, axes: tuple[int, ...], symmetric: bool,
                   calibration: str, percentile: float, full_range: bool, fmt: str,
                   scale_dtype: str) -> tuple[Array, Array | None]:
  if fmt != "int":
    return formats.format_scale(x, fmt, axes), None
  x = x.astype(jnp.float32)
  lo, hi = _range_bounds(x, axes, symmetric, calibration, percentile)
  if calibration != "mse":
    return scale_from_range(lo, hi, bits, symmetric, full_range=full_range,
                            scale_dtype=scale_dtype)

  def candidate(ratio):
    s, z = scale_from_range(lo * ratio, hi * ratio, bits, symmetric, full_range=full_range,
                            scale_dtype=scale_dtype)
    err = jnp.sum(jnp.square(fake_quant_with_scale(x, s, z, bits, symmetric,
                                                   full_range=full_range) - x), axes,
                  keepdims=True)
    return err, s, z

  def body(i, carry):
    best_err, best_s, best_z = carry
    ratio = 1.0 - (1.0 - _MSE_MIN_RATIO) * i / (_MSE_GRID - 1)
    err, s, z = candidate(ratio)
    better = err < best_err
    best_z = None if best_z is None else jnp.where(better, z, best_z)
    return jnp.where(better, err, best_err), jnp.where(better, s, best_s), best_z

  init = candidate(1.0)
  _, s, z = jax.lax.fori_loop(1, _MSE_GRID, body, init)
  return s, z


def quantize(
    x: Array, scale: Array, zero_point: Array | None = None, *, bits: int, symmetric: bool = True,
    full_range: bool = False
) -> Array:
  """``q = clip(round(x / scale) + zero_point, qmin, qmax)`` as int8 (``bits <= 8``).

  int8 holds no NaN: a NaN or +-inf in ``x`` (or in ``scale``) gives an arbitrary code (on CPU
  NaN -> 0, +inf -> qmax). Keep the codes with their calibrated scale (`compute_scale` gives
  a slice holding a NaN / inf a NaN or inf scale, so `dequantize` gives NaN there), as
  `jaxcomp.quant.qarray.quantize_weight` does, or check ``x`` first.

  Args:
    x: float array; scale/zero_point broadcast against it.

  Returns:
    int8 array of x's shape.

  Example:
    >>> quantize(jnp.array([0.5, -1.0, 9.0]), jnp.array(0.5), bits=4)
    Array([ 1, -2,  7], dtype=int8)
  """
  qmin, qmax = qrange(bits, symmetric, full_range=full_range)
  q = jnp.round(x.astype(jnp.float32) / scale)
  if zero_point is not None:
    q = q + zero_point
  return jnp.clip(q, qmin, qmax).astype(jnp.int8)


def dequantize(
    q: Array, scale: Array, zero_point: Array | None = None, dtype: jnp.dtype = jnp.float32
) -> Array:
  """``(q - zero_point) * scale`` in ``dtype``.

  Example:
    >>> dequantize(jnp.array([1, -2], jnp.int8), jnp.array(0.5))
    Array([ 0.5, -1. ], dtype=float32)
  """
  q = q.astype(jnp.float32)
  if zero_point is not None:
    q = q - zero_point
  return (q * scale).astype(dtype)


def fake_quant_with_scale(
    x: Array, scale: Array, zero_point: Array | None, bits: int, symmetric: bool = True,
    *, full_range: bool = False
) -> Array:
  """Quantize then dequantize with the given scale, differentiable in ``x`` and ``scale``.

  Gradients: the straight-through estimator clipped to the grid,
  :math:`\\partial \\hat x / \\partial x = 1` inside ``[(qmin - z) s, (qmax - z) s]`` and 0
  outside; and LSQ's step gradient :math:`\\partial \\hat x / \\partial s = -x/s + round(x/s)`
  inside, ``qmin - z`` or ``qmax - z`` outside (Esser et al., 2020, eq. 3). Stop the gradient
  of ``scale`` yourself when it is not learned.

  Example:
    >>> fake_quant_with_scale(jnp.array([0.26, 9.0]), jnp.array(0.5), None, 4)
    Array([0.5, 3.5], dtype=float32)
  """
  return grid_value(x, scale, zero_point, bits, symmetric, full_range=full_range) * scale


def grid_value(
    x: Array, scale: Array, zero_point: Array | None, bits: int, symmetric: bool = True,
    *, clip: bool = True, full_range: bool = False, fmt: str = "int"
) -> Array:
  """``clip(round_ste(x / s) + z, qmin, qmax) - z``: the integer-valued grid coordinate (float).

  ``grid_value(x, s, z, b) * s`` is the fake-quantized ``x``; keeping the two factors apart lets
  `jaxcomp.quant.dot` run the product as a real integer dot. ``clip=False`` is for symmetric
  absmax scales of ``x`` itself, where nothing lies outside the grid: the result is the same
  and the backward pass needs no mask (so no second read of ``x``).

  A float format (``fmt`` "e4m3", "e5m2", "mxfp4", "nvfp4") gives ``x / s`` rounded to its
  element format instead (`formats.round_to_float`: saturating, ties to even).

  Non-finite values: a NaN or +-inf in ``x`` gives NaN there (clipping would turn an inf into
  the grid's edge, a finite value), and a NaN or inf ``scale`` gives NaN for every element it
  scales (``x / inf`` rounds to 0, and ``0 * inf`` is NaN once the caller multiplies back).

  Example:
    >>> grid_value(jnp.array([0.26, -9.0]), jnp.array(0.5), None, 4)
    Array([ 1., -7.], dtype=float32)
    >>> grid_value(jnp.array([0.26, jnp.inf]), jnp.array(0.5), None, 4)
    Array([ 1., nan], dtype=float32)
  """
  if fmt != "int":
    return formats.round_to_float(x.astype(jnp.float32) / scale, formats.element_format(fmt))
  qmin, qmax = qrange(bits, symmetric, full_range=full_range)
  x = x.astype(jnp.float32)
  v = round_ste(x / scale)
  if zero_point is None:
    return _keep_nonfinite(x, _clip(v, qmin, qmax)) if clip else v  # unclipped: NaN / inf stay
  z = jax.lax.stop_gradient(zero_point)
  return _keep_nonfinite(x, _clip(v + z, qmin, qmax) - z)


def _keep_nonfinite(x: Array, v: Array) -> Array:
  """``v`` where ``x`` is finite, NaN where it is not (one fused elementwise select)."""
  return jnp.where(jnp.isfinite(x), v, jnp.nan)


def _clip(v: Array, lo: float, hi: float) -> Array:
  """Clip whose gradient is 1 on the closed range [lo, hi] (jnp.clip halves it at the edges)."""
  return jnp.where(v > hi, hi, jnp.where(v < lo, lo, v))


def fake_quant(
    x: Array,
    bits: int,
    *,
    axes: Axes = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
) -> Array:
  """Fake quantization with a calibrated, constant scale and a straight-through gradient.

  .. math::  \\hat x = (clip(round(x / s) + z, q_{min}, q_{max}) - z) \\, s

  with ``s, z = compute_scale(x, bits, axes=axes, ...)`` held constant (stop-gradient). The
  backward pass is the clipped STE: gradient 1 where ``x`` lies inside the grid's range, 0
  outside (only clipping calibrations clip).

  Non-finite values propagate, never hide: a NaN or +-inf in ``x`` makes its scale NaN
  (every calibration), so every element sharing that scale (the whole tensor per tensor, the
  slice along ``axes`` otherwise, e.g. the whole column of a (K, N) kernel with ``axes=0``)
  comes out NaN; other slices are unchanged.

  Args:
    x: float array.
    bits: 2..8.
    axes: axes sharing one scale (None: per tensor).

  Returns:
    Array of x's shape and dtype, on the grid.

  Example:
    >>> x = jnp.linspace(-1, 1, 5)
    >>> fake_quant(x, 2)     # grid {-1, 0, 1} * 1.0
    Array([-1.,  0.,  0.,  0.,  1.], dtype=float32)
    >>> fake_quant(jnp.array([[1.0, 4.0], [jnp.inf, 3.0]]), 2, axes=0)   # column 0 shares the inf
    Array([[nan,  4.],
           [nan,  4.]], dtype=float32)
  """
  s, z = compute_scale(x, bits, axes=axes, symmetric=symmetric, calibration=calibration,
                       percentile=percentile)
  s = jax.lax.stop_gradient(s)
  return fake_quant_with_scale(x, s, z, bits, symmetric).astype(x.dtype)


def lsq_init(x: Array, bits: int, *, axes: Axes = None, symmetric: bool = True) -> Array:
  """LSQ's initial step size ``2 mean(|x|) / sqrt(Qp)`` reduced over ``axes`` (keepdims).

  Example:
    >>> lsq_init(jnp.ones((4, 2)), 8, axes=0).shape
    (1, 2)
  """
  _, qmax = qrange(bits, symmetric)
  m = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=_axes(x, axes), keepdims=True)
  return _safe(2.0 * m / jnp.sqrt(qmax))


def lsq_grad_scale(x_size: int, step_size: int, bits: int, symmetric: bool = True,
                   full_range: bool = False) -> float:
  """LSQ's step-gradient scale ``1 / sqrt(N * Qp)``, N the elements sharing one step.

  Example:
    >>> round(lsq_grad_scale(x_size=4096, step_size=16, bits=8), 6)  # 1 / sqrt(256 * 127)
    0.005546
  """
  _, qmax = qrange(bits, symmetric, full_range=full_range)
  n = max(x_size // max(step_size, 1), 1)
  return 1.0 / (n * qmax) ** 0.5


def lsq_fake_quant(
    x: Array, step: Array, bits: int, *, symmetric: bool = True, zero_point: Array | None = None,
    full_range: bool = False
) -> Array:
  """Fake quantization with a learned step size (LSQ, Esser et al., 2020).

  .. math::  \\hat x = clip(round(x / s), q_{min}, q_{max}) \\, s

  The gradient to ``x`` is the clipped STE; the gradient to ``step`` is LSQ's
  ``-x/s + round(x/s)`` inside the range, ``qmin``/``qmax`` outside, scaled by
  :math:`g = 1 / \\sqrt{N Q_p}` with N the number of elements sharing one step.

  Non-finite values propagate, never hide: a NaN or +-inf element of ``x`` comes out NaN (it
  is not clipped to the grid's edge); the other elements are unchanged (the step is given, not
  calibrated from ``x``). An inf step makes every element it scales NaN.

  ``step`` must be positive. A concrete step (a Python number, a numpy array or a jax array
  outside ``jit``) holding a value that is not > 0 (zero, negative, NaN) is a `ValueError`; a
  traced step (inside ``jit``, where checking would need a host sync) is not checked: every
  element a step <= 0 or NaN scales comes out NaN (so a step driven to 0 or below by training
  shows up as a NaN loss, not as silently flipped or zeroed weights).

  Args:
    x: float array.
    step: positive step sizes broadcasting against ``x`` (e.g. (1, N) for a (K, N) kernel).
    bits: 2..8.

  Raises:
    ValueError: a concrete ``step`` holds a value that is not > 0.

  Example:
    >>> w = jnp.array([[0.3, -1.2], [0.9, 0.1]])
    >>> step = lsq_init(w, 4, axes=0)
    >>> jax.grad(lambda s: lsq_fake_quant(w, s, 4).sum())(step).shape
    (1, 2)
    >>> lsq_fake_quant(jnp.array([0.3, jnp.inf]), jnp.array(0.1), 4)
    Array([0.3, nan], dtype=float32)
  """
  _check_step(step)
  g = lsq_grad_scale(x.size, jnp.size(step), bits, symmetric, full_range)
  step = jnp.where(step > 0, step, jnp.nan)  # a traced step <= 0: NaN, not a silent 0 or flip
  s = grad_scale(step, g)
  return fake_quant_with_scale(x, s, zero_point, bits, symmetric,
                               full_range=full_range).astype(x.dtype)


def _check_step(step: Any) -> None:
  """A one-line error for a concrete step holding a value <= 0 (or NaN); traced: nothing."""
  if isinstance(step, jax.core.Tracer):
    return
  if isinstance(step, (int, float, np.ndarray, np.generic, jax.Array)):
    values = np.asarray(step, np.float64)
    if values.size and not (values > 0).all():
      first = values.reshape(-1)[np.flatnonzero(~(values.reshape(-1) > 0))[0]]
      raise ValueError(f"lsq_fake_quant: step must be > 0 everywhere, got {float(first)}"
                       + (f" (step shape {values.shape})" if values.ndim else ""))


def quantize_per_token(x: Array, bits: int = 8) -> tuple[Array, Array]:
  """Dynamic symmetric per-token quantization: one scale per row (last axis reduced).

  Args:
    x: float[..., K].

  Returns:
    ``(q int8[..., K], scale float32[..., 1])`` with ``x ~= q * scale``.

  Example:
    >>> q, s = quantize_per_token(jnp.array([[1.0, -2.0], [0.1, 0.2]]))
    >>> q
    Array([[ 64, -127],
           [ 64,  127]], dtype=int8)
  """
  s, _ = compute_scale(x, bits, axes=-1)
  return quantize(x, s, bits=bits), s
