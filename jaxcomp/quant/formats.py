"""Floating-point element formats: fp8 (E4M3, E5M2), FP4 (E2M1) and the micro-scaled MXFP4 / NVFP4.

A float format quantizes ``v = x / s`` by rounding it to the nearest value the format can
represent, as an integer grid rounds ``x / s`` to the nearest integer; the representable values
are spaced by powers of two, not evenly. Conventions (shared with `jaxcomp.quant.core`):

* Round to nearest, ties to even (IEEE 754; the rounding of ``astype`` to the ml_dtypes types,
  which this module relies on).
* Saturating: ``|v|`` beyond the format's largest finite value ``fmax`` becomes ``+-fmax``
  (e4m3fn has no inf and casts an overflow to NaN; e5m2 would give inf; e2m1 has neither).
  This is the OCP 8-bit FP spec's saturating mode and what the MX spec asks of conversions.
* Non-finite values propagate, never hide: a NaN or +-inf in ``v`` comes out NaN (e2m1 has no
  NaN: a plain cast would give -0 or 6).
* The backward pass is the clipped straight-through estimator: gradient 1 where ``|v| <=
  fmax``, 0 where saturated.

Scales:

* fp8 per tensor / channel: ``s = absmax / fmax`` in float32 (`float_scale`).
* MXFP4 (OCP Microscaling Formats spec v1.0, sec. 6.3): blocks of 32 consecutive elements share
  an E8M0 scale, a power of two ``2^(floor(log2(absmax)) - emax)`` with ``emax = 2`` the
  exponent of E2M1's largest normal (6 = 1.5 * 2^2); elements whose ``v`` exceeds 6 then
  saturate (the spec's choice; `mx_scale`).
* NVFP4 (NVIDIA's Blackwell format, as described in its Transformer Engine docs): blocks of 16
  share an E4M3 scale ``round_e4m3(absmax_block / (6 g))``, times one float32 scale per tensor
  ``g = absmax_tensor / (6 * 448)`` that keeps the block scales in E4M3's range (`nv_scale`).

Stored sizes: E4M3 / E5M2 8 bits; MXFP4 4 + 8/32 = 4.25 bits per element; NVFP4 4 + 8/16 = 4.5
(plus 32 bits per tensor).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """A floating-point element format: its name, jnp dtype, largest finite value and bits."""

  name: str
  dtype: jnp.dtype
  fmax: float
  bits: int
  emax: int  # exponent of the largest normal value: fmax = (2 - 2^-m) * 2^emax, or less


def _fmt(name: str, dtype) -> FloatFormat:
  info = ml_dtypes.finfo(dtype)
  return FloatFormat(name, jnp.dtype(dtype), float(info.max), int(info.bits),
                     int(np.floor(np.log2(float(info.max)))))


FLOAT_FORMATS = {
    "e4m3": _fmt("e4m3", jnp.float8_e4m3fn),  # fmax 448, no inf
    "e5m2": _fmt("e5m2", jnp.float8_e5m2),  # fmax 57344
    "e2m1": _fmt("e2m1", jnp.float4_e2m1fn),  # fmax 6: {0, .5, 1, 1.5, 2, 3, 4, 6}
}

# Micro-scaled formats: element format, block size, scale format.
MX_BLOCK = 32  # MXFP4: 32 elements share an E8M0 (power-of-two) scale
NV_BLOCK = 16  # NVFP4: 16 elements share an E4M3 scale (times a float32 scale per tensor)
_E4M3_TINY = 2.0 ** -9  # E4M3's smallest positive (subnormal) value


def float_format(name: str) -> FloatFormat:
  """The `FloatFormat` called ``name`` ("e4m3", "e5m2", "e2m1"), or a one-line ValueError.

  Example:
    >>> float_format("e4m3").fmax
    448.0
  """
  if name not in FLOAT_FORMATS:
    raise ValueError(f"float format must be one of {', '.join(FLOAT_FORMATS)}; got {name!r}")
  return FLOAT_FORMATS[name]


def representable(name: str) -> np.ndarray:
  """Every finite value of format ``name``, sorted ascending (float64, -0 dropped).

  Example:
    >>> representable("e2m1").tolist()
    [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
  """
  fmt = float_format(name)
  n = 1 << fmt.bits
  # Every code (ml_dtypes' float4 occupies a byte, its value the low nibble's).
  values = np.arange(n, dtype=np.uint8).view(fmt.dtype.type).astype(np.float64)
  values = values[np.isfinite(values)]
  return np.unique(values + 0.0)  # +0.0 merges -0 into 0


def round_to_float(v: Array, name: str) -> Array:
  """``v`` rounded to the nearest value of format ``name`` (ties to even), saturating at
  ``+-fmax``, NaN where ``v`` is not finite; float32 out. Straight-through gradient inside
  ``[-fmax, fmax]`` (and within 2^-20 relative above it), 0 where saturated.

  Args:
    v: float array (already divided by its scale).
    name: "e4m3", "e5m2" or "e2m1".

  Returns:
    float32 array of ``v``'s shape, every finite element a value of the format.

  Example:
    >>> round_to_float(jnp.array([0.25, 0.75, 2.5, 5.0, 7.0, jnp.inf]), "e2m1")
    Array([ 0.,  1.,  2.,  4.,  6., nan], dtype=float32)
  """
  fmt = float_format(name)
  v = v.astype(jnp.float32)
  # An absmax scale puts the largest element at fmax up to float32 rounding: a few ulps above
  # still count as inside (gradient 1), as the integer grid's absmax path does not clip.
  inside = jnp.abs(v) <= fmt.fmax * (1 + 2.0 ** -20)
  clipped = jnp.clip(v, -fmt.fmax, fmt.fmax)
  if name == "e2m1":  # XLA's float32 -> f4 cast can round twice (5 + 1ulp -> 4): by the table
    q = jnp.sign(clipped) * _e2m1_magnitude(jnp.abs(clipped))
  else:
    q = clipped.astype(fmt.dtype).astype(jnp.float32)
  q = jnp.where(jnp.isfinite(v), q + 0.0, jnp.nan)  # + 0.0: -0 -> 0, as the integer grid
  # STE: identity inside the range, zero gradient where saturated (as the integer grid's clip);
  # `t - stop_gradient(t)` is exactly 0 forward, so a huge `v` cannot cancel `q` away.
  t = jnp.where(inside, v, 0.0)
  return jax.lax.stop_gradient(q) + (t - jax.lax.stop_gradient(t))


def _absmax(x: Array, axes) -> Array:
  """``max |x|`` over ``axes`` (None: all; keepdims) in float32, NaN for a slice holding a NaN or
  +-inf (XLA's max-reductions need not propagate NaN)."""
  axes = tuple(range(x.ndim)) if axes is None else tuple(
      a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes))
  x = x.astype(jnp.float32)
  bad = ~jnp.all(jnp.isfinite(x), axis=axes, keepdims=True)
  return jnp.where(bad, jnp.nan, jnp.max(jnp.abs(x), axis=axes, keepdims=True))


def _e2m1_magnitude(a: Array) -> Array:
  """Nearest E2M1 magnitude of ``a`` in [0, 6], ties to the even code (float32)."""
  mags = jnp.asarray(_E2M1_MAGNITUDES, jnp.float32)
  mids = (mags[:-1] + mags[1:]) / 2
  i = jnp.sum(a[..., None] > mids, axis=-1)  # index of the nearest, ties resolved low
  tie = jnp.any(a[..., None] == mids, axis=-1)
  i = jnp.where(tie & (i % 2 == 1), i + 1, i)  # a tie goes to the even code
  return jnp.take(mags, i)


def float_scale(x: Array, name: str, *, axes=None) -> Array:
  """Scale mapping ``absmax(x)`` over ``axes`` (keepdims) onto format ``name``'s ``fmax``.

  An all-zero slice gets scale 1; a slice holding a NaN or +-inf gets a NaN scale.

  Example:
    >>> float_scale(jnp.array([[1.0, -896.0]]), "e4m3", axes=0)
    Array([[0.00223214, 2.        ]], dtype=float32)
  """
  s = _absmax(x, axes) / float_format(name).fmax  # NaN stays NaN
  return jnp.where(s > 0, s, jnp.where(jnp.isnan(s), jnp.nan, 1.0))


def mx_scale(amax: Array, name: str = "e2m1") -> Array:
  """The MX block scale for block absmax ``amax``: ``2^(floor(log2 amax) - emax)`` (E8M0,
  OCP MX v1.0), ``emax`` the exponent of the element format's largest normal (2 for E2M1).
  A zero block gets 1; a NaN / inf absmax gives NaN.

  Example:
    >>> mx_scale(jnp.array([6.0, 7.9, 8.0, 0.0]))
    Array([1., 1., 2., 1.], dtype=float32)
  """
  amax = amax.astype(jnp.float32)
  _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))  # amax = m 2^e, m in [0.5, 1): exact
  exp = jnp.clip(e - 1 - float_format(name).emax, -127, 127)  # E8M0's range
  s = jnp.where(amax > 0, jnp.ldexp(jnp.float32(1.0), exp), 1.0)  # exact powers of two
  return jnp.where(jnp.isfinite(amax), s, jnp.nan)


def nv_scale(amax: Array, tensor_amax: Array) -> tuple[Array, Array]:
  """NVFP4's two-level scale: ``(block, global)``, the element scale ``block * global``.

  ``global`` is the power of two at or above ``tensor_amax / (6 * 448)`` (so every block scale
  fits E4M3); ``block = round_e4m3(amax / (6 * global))``, a value of E4M3. The global scale is
  a float32 in NVFP4; rounding it to a power of two keeps ``block * global`` exact in float32,
  so dequantizing as ``(v * block) * global`` or ``v * (block * global)`` gives the same bits
  (a packed model equals the fake-quantized one), and costs no precision: the block scale
  keeps E4M3's relative step 2^-3 wherever ``global`` sits. A block too small for E4M3 (under
  2^-10 of the tensor's absmax) takes E4M3's smallest value 2^-9, which still holds it
  (``|v| <= 3``); an all-zero block or tensor takes 1; a non-finite absmax gives NaN.

  Args:
    amax: absmax of each block of 16, any shape.
    tensor_amax: absmax of the whole tensor, broadcastable to ``amax``.

  Example:
    >>> b, g = nv_scale(jnp.array([6.0, 3.0]), jnp.array(6.0 * 448))
    >>> b, g
    (Array([1. , 0.5], dtype=float32), Array(1., dtype=float32))
  """
  e2m1, e4m3 = float_format("e2m1"), float_format("e4m3")
  amax = amax.astype(jnp.float32)
  tensor_amax = jnp.asarray(tensor_amax, jnp.float32)
  m, e = jnp.frexp(tensor_amax / (e2m1.fmax * e4m3.fmax))  # = m 2^e, m in [0.5, 1)
  g = jnp.ldexp(jnp.float32(1.0), jnp.where(m == 0.5, e - 1, e))  # the power of two >= it
  g = jnp.where(tensor_amax > 0, g, 1.0)
  g = jnp.where(jnp.isfinite(tensor_amax), g, jnp.nan)
  b = round_to_float(jax.lax.stop_gradient(amax / (e2m1.fmax * g)), "e4m3")
  b = jnp.where(amax > 0, jnp.maximum(b, _E4M3_TINY), jnp.where(jnp.isnan(b), jnp.nan, 1.0))
  return b, g


_ELEMENTS = {"e4m3": "e4m3", "e5m2": "e5m2", "mxfp4": "e2m1", "nvfp4": "e2m1"}


def element_format(fmt: str) -> str:
  """The element format of weight / activation format ``fmt``.

  Example:
    >>> element_format("mxfp4"), element_format("e4m3")
    ('e2m1', 'e4m3')
  """
  if fmt not in _ELEMENTS:
    raise ValueError(f"format must be one of {', '.join(_ELEMENTS)}; got {fmt!r}")
  return _ELEMENTS[fmt]


def format_scale(x: Array, fmt: str, axes) -> Array:
  """The scale of ``x`` in format ``fmt``, one per slice reduced over ``axes`` (keepdims):
  fp8 ``absmax / fmax``; MXFP4 the E8M0 power of two of `mx_scale`; NVFP4 ``block * global``
  of `nv_scale` with ``global`` from the absmax of all of ``x`` (one kernel's worth). A slice
  holding a NaN or +-inf gets a NaN scale (NVFP4: the whole tensor's, through ``global``).

  Example:
    >>> format_scale(jnp.array([[1.0, 2.0], [12.0, 3.0]]), "mxfp4", axes=1).ravel()
    Array([0.5, 2. ], dtype=float32)
  """
  if fmt in ("e4m3", "e5m2"):
    return float_scale(x, fmt, axes=axes)
  amax = _absmax(x, axes)
  if fmt == "mxfp4":
    return mx_scale(amax, "e2m1")
  if fmt == "nvfp4":
    b, g = nv_scale(amax, jnp.max(amax))  # NaN in any block: NaN everywhere, as it should
    return b * g
  raise ValueError(f"format must be one of e4m3, e5m2, mxfp4, nvfp4; got {fmt!r}")


# ------------------------------------------------------------------ stored codes (packing)

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8: negative


def encode(v: Array, elem: str) -> Array:
  """The bit patterns (uint8) of values ``v`` of element format ``elem`` (as `round_to_float`
  gives them): a byte per fp8 value; E2M1's 4-bit code (0..15: sign bit 3, magnitude index
  0..7) in the low nibble.

  Example:
    >>> encode(jnp.array([1.5, -6.0, 0.0]), "e2m1")
    Array([ 3, 15,  0], dtype=uint8)
  """
  if elem == "e2m1":
    mag = jnp.searchsorted(jnp.asarray(_E2M1_MAGNITUDES, jnp.float32), jnp.abs(v))
    return (mag.astype(jnp.uint8) | jnp.where(v < 0, 8, 0).astype(jnp.uint8))
  return jax.lax.bitcast_convert_type(v.astype(float_format(elem).dtype), jnp.uint8)


def decode(codes: Array, elem: str) -> Array:
  """float32 values of the uint8 bit patterns ``codes`` of ``elem`` (inverse of `encode`).

  Example:
    >>> decode(jnp.array([3, 15, 0], jnp.uint8), "e2m1")
    Array([ 1.5, -6. ,  0. ], dtype=float32)
  """
  if elem == "e2m1":
    table = jnp.asarray(_E2M1_MAGNITUDES + tuple(-m for m in _E2M1_MAGNITUDES), jnp.float32)
    return jnp.take(table, (codes & 15).astype(jnp.int32))
  return jax.lax.bitcast_convert_type(codes, float_format(elem).dtype).astype(jnp.float32)


def encode_e8m0(s: Array) -> Array:
  """MX scales (powers of two, float32) as E8M0 bytes: the exponent plus 127 (NaN -> 255).

  Example:
    >>> encode_e8m0(jnp.array([1.0, 0.25, 8.0]))
    Array([127, 125, 130], dtype=uint8)
  """
  _, e = jnp.frexp(s)
  return jnp.where(jnp.isfinite(s), e - 1 + 127, 255).astype(jnp.uint8)


def decode_e8m0(codes: Array) -> Array:
  """float32 powers of two of E8M0 bytes (255: NaN), inverse of `encode_e8m0`.

  Example:
    >>> decode_e8m0(jnp.array([127, 125, 130], jnp.uint8))
    Array([1.  , 0.25, 8.  ], dtype=float32)
  """
  s = jnp.ldexp(jnp.float32(1.0), codes.astype(jnp.int32) - 127)
  return jnp.where(codes == 255, jnp.nan, s)


def split_nv_step(step: Array) -> tuple[Array, Array]:
  """An NVFP4 step ``block * global`` (as `format_scale` gives it, or a solver keeps it) split
  back into E4M3 block scales and the power-of-two global: ``global = 2^ceil(log2(max / 448))``
  and ``block = step / global``, exact (each block is its E4M3 value times 1 or 2, at most
  448). Returns ``(block, global)`` with ``block * global == step`` bit for bit.

  Example:
    >>> b, g = split_nv_step(jnp.array([0.75, 0.125]))
    >>> b * g
    Array([0.75 , 0.125], dtype=float32)
  """
  step = step.astype(jnp.float32)
  top = jnp.max(jnp.where(jnp.isfinite(step), step, 0.0))
  m, e = jnp.frexp(top / float_format("e4m3").fmax)
  g = jnp.where(top > 0, jnp.ldexp(jnp.float32(1.0), jnp.where(m == 0.5, e - 1, e)), 1.0)
  return step / g, g
