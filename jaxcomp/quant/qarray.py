"""Packed quantized weights: `QArray` (a pytree) and int4 packing.

A `QArray` holds a kernel as integers plus the scales (and zero points) needed to rebuild it:
int8 values for 5-8 bits, or two 4-bit values per byte for 2-4 bits, packed along the kernel's
last contracting axis. Its dequantized value equals `jaxcomp.quant.dot.fake_quant_weight` of the
same kernel and spec exactly, so a QAT model and its packed serving form compute the same thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant import core
from jaxcomp.quant.dot import weight_scale_shape
from jaxcomp.quant.spec import Quant

Array = jax.Array


def pack_int4(q: Array, axis: int = 0) -> Array:
  """Packs int4 values (int8 holding [-8, 7]) two per byte along ``axis`` (even length).

  Element ``2i`` goes to the low nibble of byte ``i``, ``2i + 1`` to the high nibble.

  Args:
    q: int8 array, values in [-8, 7]; ``q.shape[axis]`` even.
    axis: the axis to halve.

  Returns:
    uint8 array with ``shape[axis] // 2``.

  Example:
    >>> pack_int4(jnp.array([1, -1, 7, -8], jnp.int8))
    Array([241, 135], dtype=uint8)
  """
  axis = axis % q.ndim
  if q.shape[axis] % 2:
    raise ValueError(f"pack_int4: axis {axis} has odd length {q.shape[axis]}")
  u = q.astype(jnp.uint8) & 0xF
  lo = jax.lax.slice_in_dim(u, 0, None, 2, axis)
  hi = jax.lax.slice_in_dim(u, 1, None, 2, axis)
  return lo | (hi << 4)


def unpack_int4(p: Array, axis: int = 0) -> Array:
  """Inverse of `pack_int4`: uint8 bytes -> int8 values in [-8, 7], ``shape[axis] * 2``.

  Example:
    >>> unpack_int4(jnp.array([241, 135], jnp.uint8))
    Array([ 1, -1,  7, -8], dtype=int8)
  """
  axis = axis % p.ndim
  signed = lambda n: (n.astype(jnp.int8) << 4) >> 4  # sign-extend a nibble
  lo, hi = signed(p & 0xF), signed(p >> 4)
  both = jnp.stack([lo, hi], axis=axis + 1)
  shape = list(p.shape)
  shape[axis] *= 2
  return both.reshape(shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized kernel: integer values, scales, and how to put them back together.

  Attributes:
    values: int8 (``bits > 4``) or uint8 with two values a byte along ``pack_axis``.
    scale: float32 scales in the layout `weight_scale_shape` gives (contracting axes collapsed
      to 1, or to ``size // group`` on the grouped axis).
    zero_point: float32 zero points like ``scale`` (asymmetric), or None.
    bits: grid width (static).
    shape: the logical (unpacked) shape (static).
    pack_axis: the axis holding packed pairs, or None when not packed (static).
  """

  values: Array
  scale: Array
  zero_point: Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  pack_axis: int | None = dataclasses.field(metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Bytes of values, scales and zero points as stored."""
    leaves = [self.values, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves))

  def ints(self) -> Array:
    """The integer grid values as int8, in the logical shape."""
    if self.pack_axis is None:
      return self.values
    return unpack_int4(self.values, self.pack_axis)

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> Array:
    """``(q - z) * s`` broadcast back to the logical shape."""
    q = self.ints().astype(jnp.float32)
    s = _expand(self.scale, self.shape)
    if self.zero_point is not None:
      q = q - _expand(self.zero_point, self.shape)
    return (q * s).astype(dtype)


def _expand(s: Array, shape: Sequence[int]) -> Array:
  """Repeats each entry of a scale along the axes it covers (block-wise) to ``shape``."""
  for axis, (n, size) in enumerate(zip(s.shape, shape)):
    if n != size:
      s = jnp.repeat(s, size // n, axis=axis)
  return s


def quantize_weight(w: Array, contracting: Sequence[int], spec: Quant) -> QArray:
  """Quantizes a kernel into a packed `QArray` with ``spec``'s bits, granularity and calibration.

  Args:
    w: kernel, e.g. (K, N) for a dense layer.
    contracting: the axes the layer contracts over (0 for (K, N)); the scale layout follows
      `weight_scale_shape`, and int4 values are packed along the last contracting axis.
    spec: a `jaxcomp.Quant` (``w_bits``, ``granularity``/``group``, ``calibration``,
      ``w_symmetric``).

  Returns:
    A `QArray` whose `dequantize()` equals ``fake_quant_weight(w, contracting, spec)``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> qa = quantize_weight(w, (0,), jc.Quant(w_bits=4, group=128))
    >>> qa.values.shape, qa.values.dtype, qa.scale.shape
    ((128, 64), dtype('uint8'), (2, 64))
  """
  nd = w.ndim
  contracting = tuple(a % nd for a in contracting)
  scale_shape = weight_scale_shape(w.shape, contracting, spec)
  split = []
  for size, n in zip(w.shape, scale_shape):
    split += [n, size // n]
  blocks = w.astype(jnp.float32).reshape(split)
  axes = tuple(range(1, 2 * nd, 2))
  s, z = core.compute_scale(blocks, spec.w_bits, axes=axes, symmetric=spec.w_symmetric,
                            calibration=spec.calibration, percentile=spec.percentile)
  q = core.quantize(blocks, s, z, bits=spec.w_bits, symmetric=spec.w_symmetric).reshape(w.shape)
  s = s.reshape(scale_shape)
  z = None if z is None else z.reshape(scale_shape)
  pack_axis = None
  if spec.w_bits <= 4 and w.shape[contracting[-1]] % 2 == 0:
    pack_axis = contracting[-1]
    q = pack_int4(q, pack_axis)
  return QArray(values=q, scale=s, zero_point=z, bits=spec.w_bits, shape=tuple(w.shape),
                pack_axis=pack_axis)
