"""Packed quantized weights: `QArray` (a pytree) and int4 packing.

A `QArray` holds a kernel as integers plus the scales (and zero points) needed to rebuild it:
int8 values for 5-8 bits, or 2-4-bit values packed densely (float formats, `QArray.fmt`: fp8
bytes or E2M1 codes two a byte, with their scale bytes), in the canonical (N, K) layout (one
row per output channel, the contracting axes flattened last). Its dequantized value equals
`jaxcomp.quant.dot.fake_quant_weight` of the same kernel and spec exactly, so a QAT model and
its packed serving form compute the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant import core
from jaxcomp.quant import formats
from jaxcomp.quant.spec import Quant, weight_scale_shape

Array = jax.Array


def pack_int4(q: Array, axis: int = 0) -> Array:
  """Packs int4 values (int8 holding [-8, 7]) two per byte along ``axis`` (even length).

  Element ``2i`` goes to the low nibble of byte ``i`` *offset by 8* (``q + 8``, in [0, 15]),
  element ``2i + 1`` to the high nibble in two's complement, so that the byte read as int8 is
  ``16 * q[2i + 1] + q[2i] + 8``: an affine function of the pair. An int8 GEMM can then run on
  the stored bytes as they are (the packed W4A8 decode path, `jaxcomp.quant.dot`), and the
  even values come back with a single ``& 15``.

  Args:
    q: int8 array, values in [-8, 7]; ``q.shape[axis]`` even.
    axis: the axis to halve.

  Returns:
    int8 array with ``shape[axis] // 2``.

  Example:
    >>> pack_int4(jnp.array([1, -1, 7, -8], jnp.int8))
    Array([  -7, -113], dtype=int8)
  """
  axis = axis % q.ndim
  if q.shape[axis] % 2:
    raise ValueError(f"pack_int4: axis {axis} has odd length {q.shape[axis]}")
  nibbles = pack_codes(q.astype(jnp.uint8) & 0xF, axis)  # two's-complement nibbles
  return jax.lax.bitcast_convert_type(nibbles ^ 0x8, jnp.int8)  # low nibble -> offset binary


def unpack_int4(p: Array, axis: int = 0) -> Array:
  """Inverse of `pack_int4`: int8 bytes -> int8 values in [-8, 7], ``shape[axis] * 2``.

  Example:
    >>> unpack_int4(jnp.array([-7, -113], jnp.int8))
    Array([ 1, -1,  7, -8], dtype=int8)
  """
  if p.dtype != jnp.int8:
    raise TypeError(f"unpack_int4: packed int4 bytes are int8 (pack_int4's layout), got "
                    f"{p.dtype}")
  axis = axis % p.ndim
  lo, hi = (p & 0xF) - 8, p >> 4  # the offset low nibble; the arithmetic shift sign-extends
  both = jnp.stack([lo, hi], axis=axis + 1)
  shape = list(p.shape)
  shape[axis] *= 2
  return both.reshape(shape)


def pack_codes(codes: Array, axis: int = 0) -> Array:
  """Packs 4-bit codes (uint8 in [0, 15], e.g. E2M1) two per byte along ``axis``: code
  ``2i`` in the low nibble, ``2i + 1`` in the high one (the OCP MX layout).

  Example:
    >>> pack_codes(jnp.array([1, 15], jnp.uint8))
    Array([241], dtype=uint8)
  """
  axis = axis % codes.ndim
  if codes.shape[axis] % 2:
    raise ValueError(f"pack_codes: axis {axis} has odd length {codes.shape[axis]}")
  u = codes.astype(jnp.uint8) & 0xF
  return (jax.lax.slice_in_dim(u, 0, None, 2, axis)
          | (jax.lax.slice_in_dim(u, 1, None, 2, axis) << 4))


def unpack_codes(p: Array, axis: int = 0) -> Array:
  """Inverse of `pack_codes`: uint8 bytes -> uint8 codes, ``shape[axis] * 2``.

  Example:
    >>> unpack_codes(jnp.array([241], jnp.uint8))
    Array([ 1, 15], dtype=uint8)
  """
  axis = axis % p.ndim
  both = jnp.stack([p & 0xF, p >> 4], axis=axis + 1)
  shape = list(p.shape)
  shape[axis] *= 2
  return both.reshape(shape)


def values_per_unit(bits: int) -> int:
  """How many ``bits``-wide values fill a whole number of bytes (2 for 4 bits, 4 for 2, 8 for
  3): `pack_bits` packs along an axis whose length is a multiple of it.

  Example:
    >>> values_per_unit(3), values_per_unit(4)
    (8, 2)
  """
  if not 1 <= bits <= 4:
    raise ValueError(f"bit packing takes 1 to 4 bits a value, got {bits}")
  return 8 // math.gcd(8, bits)


def pack_bits(q: Array, bits: int, axis: int = 0) -> Array:
  """Packs signed ``bits``-wide integers (int8 holding ``[-2^(bits-1), 2^(bits-1))``) densely
  along ``axis``: value ``i`` takes bits ``bits*i .. bits*i + bits - 1`` of the little-endian bit
  stream, so ``values_per_unit(bits)`` values fill ``bits * values_per_unit(bits) / 8`` bytes
  (3 bits: 8 values in 3 bytes). 4 bits are `pack_int4`'s layout (int8 bytes, the low
  nibble offset by 8).

  Args:
    q: int8 array; ``q.shape[axis]`` a multiple of `values_per_unit`.
    bits: 1 to 4.
    axis: the axis to pack.

  Returns:
    uint8 array with ``shape[axis] * bits // 8`` (int8 for 4 bits).

  Example:
    >>> pack_bits(jnp.array([1, -1, 0, -2], jnp.int8), 2)
    Array([141], dtype=uint8)
  """
  if bits == 4:
    return pack_int4(q, axis)
  axis = axis % q.ndim
  per = values_per_unit(bits)
  if q.shape[axis] % per:
    raise ValueError(f"pack_bits: axis {axis} has length {q.shape[axis]}, not a multiple of "
                     f"{per} ({bits}-bit values)")
  u = jnp.moveaxis(q, axis, -1).astype(jnp.uint32) & ((1 << bits) - 1)
  u = u.reshape(u.shape[:-1] + (-1, per))
  word = jnp.zeros(u.shape[:-1], jnp.uint32)
  for i in range(per):  # at most 24 bits a word (8 values of 3 bits)
    word = word | (u[..., i] << (bits * i))
  nbytes = bits * per // 8
  out = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(nbytes)], axis=-1)
  out = out.reshape(out.shape[:-2] + (-1,)).astype(jnp.uint8)
  return jnp.moveaxis(out, -1, axis)


def unpack_bits(p: Array, bits: int, axis: int = 0) -> Array:
  """Inverse of `pack_bits`: the bytes -> int8 values, ``shape[axis] * 8 // bits``.

  Example:
    >>> unpack_bits(jnp.array([141], jnp.uint8), 2)
    Array([ 1, -1,  0, -2], dtype=int8)
  """
  if bits == 4:
    return unpack_int4(p, axis)
  axis = axis % p.ndim
  per = values_per_unit(bits)
  nbytes = bits * per // 8
  b = jnp.moveaxis(p, axis, -1).astype(jnp.uint32)
  b = b.reshape(b.shape[:-1] + (-1, nbytes))
  word = jnp.zeros(b.shape[:-1], jnp.uint32)
  for j in range(nbytes):
    word = word | (b[..., j] << (8 * j))
  u = jnp.stack([(word >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1)
  u = u.reshape(u.shape[:-2] + (-1,)).astype(jnp.int32)
  signed = jnp.where(u >= 1 << (bits - 1), u - (1 << bits), u).astype(jnp.int8)
  return jnp.moveaxis(signed, -1, axis)


def canonical(w: Array, contracting: Sequence[int]) -> Array:
  """A kernel as an (N, K) matrix: free axes flattened to rows, contracting axes to columns.

  This is the layout a `QArray` stores (each output channel one contiguous row, the reduction
  axis last: what int8 GEMMs and int4 packing want). Works on kernel-layout scales too.

  Example:
    >>> canonical(jnp.zeros((64, 32)), (0,)).shape
    (32, 64)
    >>> canonical(jnp.zeros((3, 3, 8, 16)), (0, 1, 2)).shape
    (16, 72)
  """
  nd = w.ndim
  contracting = tuple(a % nd for a in contracting)
  free = tuple(a for a in range(nd) if a not in contracting)
  t = jnp.transpose(w, free + contracting)
  n = int(np.prod([w.shape[a] for a in free]))
  return t.reshape(n, -1)


def from_canonical(m: Array, shape: Sequence[int], contracting: Sequence[int]) -> Array:
  """Inverse of `canonical`: an (N, K) matrix back to the kernel ``shape``.

  Example:
    >>> w = jnp.arange(6.0).reshape(2, 3)
    >>> bool((from_canonical(canonical(w, (0,)), w.shape, (0,)) == w).all())
    True
  """
  nd = len(shape)
  contracting = tuple(a % nd for a in contracting)
  free = tuple(a for a in range(nd) if a not in contracting)
  t = m.reshape(tuple(shape[a] for a in free + contracting))
  return jnp.transpose(t, np.argsort(free + contracting))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized kernel: integer values, scales, and how to put them back together.

  Values are stored in the canonical (N, K) layout (`canonical`): one row per output channel,
  the contracting axes flattened last, so a row's groups are consecutive and int4 pairs are
  packed along K. ``dequantize()`` returns the kernel in its own (logical) layout.

  Attributes:
    values: int8 (N, K) for 5-8 bits, or (N, K * bits // 8) bytes with the values packed
      densely (`pack_bits`: two 4-bit values an int8 byte in `pack_int4`'s layout; eight
      3-bit values in three uint8 bytes, four 2-bit values a uint8 byte) when K is a
      multiple of `values_per_unit` (else int8 (N, K)).
    scale: float32 (N, ceil(K / group)) per group, (N, 1) per channel, (1, 1) per tensor.
    zero_point: float32 like ``scale`` (asymmetric grids), or None.
    bits: grid width (static).
    shape: the kernel's logical shape (static).
    contracting: the kernel axes the layer contracts over (static), e.g. ``(0,)`` for (K, N).
    packed: whether ``values`` holds ``bits``-wide values packed densely (static).
    group: elements of K per scale when grouped (the last group may be shorter), else None
      (static).
    fmt: the element format (static): "int" (the integer grid above), or a float format
      (`jaxcomp.quant.formats`): "e4m3" / "e5m2" (values: their fp8 bytes, uint8 (N, K);
      scales float32), "mxfp4" / "nvfp4" (values: E2M1 codes two a byte, uint8 (N, K / 2);
      scales: E8M0 bytes (MX) or E4M3 bytes (NV), uint8 (N, G)).
    tensor_scale: NVFP4's float32 scale per tensor (a power of two, shape ()), else None.
  """

  values: Array
  scale: Array
  zero_point: Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  contracting: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  packed: bool = dataclasses.field(metadata=dict(static=True))
  group: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  fmt: str = dataclasses.field(default="int", metadata=dict(static=True))
  tensor_scale: Array | None = None

  def __getitem__(self, index):
    # ``variable[...]`` (how Flax layers read their kernel) returns the QArray itself.
    if index is Ellipsis:
      return self
    raise TypeError("QArray supports only [...]; call .dequantize() for the float kernel")

  @property
  def sharding(self) -> QArray:
    """The sharding of each leaf (a `QArray` of them; None for leaves without one)."""
    return jax.tree.map(lambda x: getattr(x, "sharding", None), self)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes of values, scales and zero points as stored."""
    leaves = [x for x in (self.values, self.scale, self.zero_point, self.tensor_scale)
              if x is not None]
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves))

  def ints(self) -> Array:
    """The integer grid values as int8, canonical (N, K) (integer formats only)."""
    if self.fmt != "int":
      raise ValueError(f"ints: this QArray holds {self.fmt} values, not integers; use grid()")
    return unpack_bits(self.values, self.bits, 1) if self.packed else self.values

  def grid(self) -> Array:
    """The grid values as float32, canonical (N, K): the integers, or the float format's values.

    Example:
      >>> quantize_weight(jnp.ones((64, 2)), (0,), jc.Quant(w_format="mxfp4")).grid()[0, :3]
      Array([4., 4., 4.], dtype=float32)
    """
    if self.fmt == "int":
      return self.ints().astype(jnp.float32)
    elem = formats.element_format(self.fmt)
    codes = unpack_codes(self.values, 1) if self.packed else self.values
    return formats.decode(codes, elem)

  def scales(self) -> Array:
    """The scales as float32, canonical (N, G) (MX / NV: decoded, NV times its tensor scale)."""
    if self.fmt == "mxfp4":
      return formats.decode_e8m0(self.scale)
    if self.fmt == "nvfp4":
      return formats.decode(self.scale, "e4m3") * self.tensor_scale
    return self.scale.astype(jnp.float32)  # float32, or 16-bit (`Quant.scale_dtype`)

  def nibbles(self) -> Array:
    """The values as int8 (N, K // 2), two 4-bit values a byte (`pack_int4`'s layout: the
    int4 kernels' input); the stored bytes themselves when ``bits == 4``.

    Example:
      >>> quantize_weight(jnp.ones((16, 4)), (0,), jc.Quant(w_bits=3)).nibbles().shape
      (4, 8)
    """
    if not self.packed or self.fmt != "int":
      raise ValueError(f"nibbles: the {self.bits}-bit {self.fmt} values of this QArray are not "
                       "packed integers")
    return self.values if self.bits == 4 else pack_int4(self.ints(), 1)

  def dequantize_canonical(self, dtype: jnp.dtype = jnp.float32) -> Array:
    """``(q - z) * s`` as the canonical (N, K) matrix."""
    return _dequantize_canonical(self, jnp.dtype(dtype))

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> Array:
    """The fake-quantized kernel in its logical shape and layout."""
    return from_canonical(self.dequantize_canonical(dtype), self.shape, self.contracting)


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per op when called eagerly
def _dequantize_canonical(qa: QArray, dtype: jnp.dtype) -> Array:
  q = qa.grid()
  k = q.shape[1]
  s = core.expand_groups(qa.scales(), 1, qa.group or k, k)
  if qa.zero_point is not None:
    q = q - core.expand_groups(qa.zero_point.astype(jnp.float32), 1, qa.group or k, k)
  return (q * s).astype(dtype)


def _from_ints(q: Array, s: Array, z: Array | None, bits: int, shape: Sequence[int],
               contracting: Sequence[int], group: int | None,
               scale_dtype: str = "float32") -> QArray:
  """Builds a QArray from canonical int grid values (N, K) and (N, G) scales (stored in
  ``scale_dtype``: the scales must already be its values, as `core.round_scale_up` makes them)."""
  q = q.astype(jnp.int8)
  packed = bits <= 4 and q.shape[1] % values_per_unit(bits) == 0
  values = pack_bits(q, bits, 1) if packed else q
  return QArray(values=values, scale=s.astype(scale_dtype),
                zero_point=None if z is None else z.astype(scale_dtype), bits=bits,
                shape=tuple(int(d) for d in shape),
                contracting=tuple(a % len(shape) for a in contracting), packed=packed,
                group=group)


def _from_floats(m: Array, s: Array, fmt: str, shape: Sequence[int],
                 contracting: Sequence[int], group: int | None) -> QArray:
  """Builds a float-format QArray from a canonical (N, K) matrix and its (N, G) scales (or
  (1, 1) per tensor): the values rounded as `core.grid_value` rounds them, stored as codes."""
  n, k = m.shape
  elem = formats.element_format(fmt)
  v = core.grid_value(m, core.expand_groups(s, 1, group or k, k), None, 8, fmt=fmt)
  codes = formats.encode(v, elem)
  packed = elem == "e2m1" and k % 2 == 0
  values = pack_codes(codes, 1) if packed else codes
  tensor_scale = None
  if fmt == "mxfp4":
    s = formats.encode_e8m0(s)
  elif fmt == "nvfp4":
    b, tensor_scale = formats.split_nv_step(s)
    s = formats.encode(b, "e4m3")
  else:
    s = s.astype(jnp.float32)
  return QArray(values=values, scale=s, zero_point=None, bits=formats.float_format(elem).bits,
                shape=tuple(int(d) for d in shape),
                contracting=tuple(a % len(shape) for a in contracting), packed=packed,
                group=group, fmt=fmt, tensor_scale=tensor_scale)


def weight_scales(w: Array, contracting: Sequence[int], spec: Quant
                  ) -> tuple[Array, Array | None]:
  """The calibrated scales (and zero points) of a kernel in the canonical (N, G) layout.

  G is ``ceil(K / group)`` per group, 1 per channel; per tensor the result is (1, 1). This is
  the one grouping rule (along the flattened contracting axis K) that fake quantization,
  LSQ initialisation, the PTQ solvers and packing share.

  Example:
    >>> s, z = weight_scales(jnp.ones((4, 64, 256)), (0, 1), jc.Quant(w_bits=4, group=128))
    >>> s.shape, z
    ((256, 2), None)
  """
  weight_scale_shape(w.shape, contracting, spec)  # validates the group size
  m = canonical(w.astype(jnp.float32), contracting)
  s, z, _ = _blocks_and_scales(m, spec)
  return s, z


def _blocks_and_scales(m: Array, spec: Quant) -> tuple[Array, Array | None, Array]:
  """Scales (N, G), zero points and the (N or 1, G, g) blocks of a canonical (N, K) matrix."""
  n, _ = m.shape
  if spec.granularity == "group":
    blocks = core.pad_to_groups(m, 1, spec.group).reshape(n, -1, spec.group)
  elif spec.granularity == "channel":
    blocks = m[:, None, :]
  else:
    blocks = m.reshape(1, 1, -1)
  s, z = core.compute_scale(blocks, spec.w_bits, axes=2, symmetric=spec.w_symmetric,
                            calibration=spec.calibration, percentile=spec.percentile,
                            full_range=spec.full_range, fmt=spec.w_format,
                            scale_dtype=spec.scale_dtype)
  return s[..., 0], None if z is None else z[..., 0], blocks


def to_step_layout(s: Array, kernel_shape: Sequence[int], contracting: Sequence[int],
                   spec: Quant) -> Array:
  """Canonical (N, G) scales (or zero points) -> the kernel-layout step of `weight_scale_shape`.

  Example:
    >>> to_step_layout(jnp.ones((256, 2)), (4, 64, 256), (0, 1), jc.Quant(w_bits=4, group=128)).shape
    (1, 2, 256)
  """
  return from_canonical(s, weight_scale_shape(kernel_shape, contracting, spec), contracting)


def initial_step(w: Array, contracting: Sequence[int], spec: Quant) -> Array:
  """The calibrated scale of ``w`` as a step in the kernel layout (LSQ's starting point).

  QAT starts from trained weights, where the calibrated scale beats LSQ's
  ``2 mean|w| / sqrt(Qp)`` (`jaxcomp.quant.core.lsq_init`), which is coarse at 8 bits.

  Example:
    >>> initial_step(jnp.ones((3, 3, 3, 8)), (0, 1, 2), jc.Quant(w_bits=4, group=8)).shape
    (1, 1, 4, 8)
  """
  s, _ = weight_scales(w, contracting, spec)
  return to_step_layout(s, w.shape, contracting, spec).astype(jnp.float32)


def quantize_weight(w: Array, contracting: Sequence[int], spec: Quant) -> QArray:
  """Quantizes a kernel into a packed `QArray` with ``spec``'s bits, granularity and calibration.

  Args:
    w: kernel, e.g. (K, N) for a dense layer.
    contracting: the axes the layer contracts over (0 for (K, N)); scales are per output
      channel / per group of ``spec.group`` consecutive contracting elements / per tensor.
    spec: a `jaxcomp.Quant` (``w_bits``, ``granularity``/``group``, ``calibration``,
      ``w_symmetric``, ``full_range``).

  Returns:
    A `QArray` whose `dequantize()` equals ``fake_quant_weight(w, contracting, spec)``.

  Non-finite values propagate, never hide: a NaN or +-inf in ``w`` makes the scale (and zero
  point) of its group (per group), of its output channel (per channel) or of the tensor (per
  tensor) NaN, so every element sharing that scale dequantizes to NaN; the integer codes there
  are meaningless (int8 holds no NaN) and never paired with a finite scale.
  `jaxcomp.convert` refuses such kernels before packing.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> qa = quantize_weight(w, (0,), jc.Quant(w_bits=4, group=128))
    >>> qa.values.shape, qa.values.dtype, qa.scale.shape
    ((64, 128), dtype('int8'), (64, 2))
    >>> bad = quantize_weight(w.at[3, 5].set(jnp.nan), (0,), jc.Quant(w_bits=4, group=128))
    >>> int(jnp.isnan(bad.dequantize()).sum()), bool(jnp.isnan(bad.dequantize()[:128, 5]).all())
    (128, True)
  """
  weight_scale_shape(w.shape, contracting, spec)  # validates the group size
  m = canonical(w.astype(jnp.float32), contracting)
  n, k = m.shape
  s, z, blocks = _blocks_and_scales(m, spec)
  group = spec.group if spec.granularity == "group" else None
  if spec.w_format != "int":
    return _from_floats(m, s, spec.w_format, w.shape, contracting, group)
  q = core.quantize(blocks, s[..., None], None if z is None else z[..., None], bits=spec.w_bits,
                    symmetric=spec.w_symmetric, full_range=spec.full_range)
  q = q.reshape(blocks.shape[0], -1)[:, :k] if blocks.shape[0] == n else q.reshape(n, -1)
  return _from_ints(q, s, z, spec.w_bits, w.shape, contracting, group, spec.scale_dtype)


def quantize_with_step(w: Array, contracting: Sequence[int], step: Array, bits: int,
                       group: int | None = None, *, zero_point: Array | None = None,
                       full_range: bool = False, fmt: str = "int",
                       scale_dtype: str = "float32") -> QArray:
  """Packs a kernel on a given step (LSQ-trained or solved by PTQ), and zero point if any.

  Args:
    w: kernel in its own layout.
    contracting: the axes the layer contracts over.
    step: the step in the kernel layout given by `weight_scale_shape`.
    bits: grid width.
    group: the group size when ``step`` is per group (its last group may be shorter).
    zero_point: integer-valued zero points like ``step`` (an asymmetric grid), or None.
    full_range: the symmetric grid is the full signed range (``[-8, 7]`` at 4 bits).
    fmt: the element format (`Quant.w_format`); a float format ignores ``bits``.
    scale_dtype: the stored dtype of the step and zero points (`Quant.scale_dtype`); the step
      must already hold values of it (a solver's step computed under that spec does).

  Returns:
    A `QArray` whose `dequantize()` equals ``fake_quant_weight(w, contracting, spec, step)``,
    except for non-finite values: a NaN or +-inf in ``w`` gets its group's (channel's) scale
    set to NaN, so that whole group dequantizes to NaN (never a finite code on a finite step).

  Example:
    >>> w = jnp.array([[0.5, -1.0], [0.26, 2.0]])
    >>> quantize_with_step(w, (0,), jnp.array([[0.25, 0.5]]), 4).dequantize()
    Array([[ 0.5 , -1.  ],
           [ 0.25,  2.  ]], dtype=float32)
  """
  s = canonical(step.astype(jnp.float32), contracting)
  m = canonical(w.astype(jnp.float32), contracting)
  n, k = m.shape
  if s.shape[1] > 1 and group is None:
    raise ValueError(f"quantize_with_step: step {step.shape} is per group; pass group=")
  g = group if s.shape[1] > 1 else k
  if fmt != "int":  # non-finite weights: NaN grid values, NaN codes' scale below
    bad = ~jnp.isfinite(core.pad_to_groups(m, 1, g)).reshape(n, -1, g).all(axis=2)
    s = jnp.where(bad.any(axis=0, keepdims=True) if s.shape[0] == 1 else bad, jnp.nan, s)
    return _from_floats(m, s, fmt, w.shape, contracting, group if s.shape[1] > 1 else None)
  expand = lambda a: jnp.broadcast_to(core.expand_groups(a, 1, g, k), (n, k))
  z = None if zero_point is None else canonical(zero_point.astype(jnp.float32), contracting)
  qmin, qmax = core.qrange(bits, z is None, full_range=full_range)
  q = jnp.round(m / expand(s))
  q = jnp.clip(q if z is None else q + expand(z), qmin, qmax)
  # A non-finite weight: its group's scale becomes NaN (the step is given, not calibrated
  # from w, so nothing else would carry the NaN past the integer codes).
  bad = ~jnp.isfinite(core.pad_to_groups(m, 1, g)).reshape(n, -1, g).all(axis=2)
  if s.shape[0] == 1:  # per tensor: one scale for every row
    bad = bad.any(axis=0, keepdims=True)
  s = jnp.where(bad, jnp.nan, s)
  return _from_ints(q, s, z, bits, w.shape, contracting, group if s.shape[1] > 1 else None,
                    scale_dtype)


def leaf_partition_specs(qa: QArray, names: Sequence[Any] | None,
                         stack_axis: int | None = None) -> QArray:
  """One `PartitionSpec` per leaf of a packed kernel, from the kernel's axis names (logical
  names or mesh axes, one per stored axis): values and zero points ``(N, K)`` take the names of
  the kernel's first output and first contracting axis, scales ``(N, G)`` the output name
  only. A kernel stacked at ``stack_axis`` (its leaves carry that axis at the same place) keeps
  the stack's name there. No names: every leaf replicated.

  Example:
    >>> qa = quantize_weight(jnp.ones((8, 4)), (0,), Quant(w_bits=4))
    >>> leaf_partition_specs(qa, ("embed", "mlp")).scale
    P('mlp', None)
  """
  P = jax.sharding.PartitionSpec
  if names is None:
    return jax.tree.map(lambda _: P(), qa)
  layer_names = list(names)
  stack_name = None if stack_axis is None else layer_names.pop(stack_axis)
  out = next((n for a, n in enumerate(layer_names) if a not in qa.contracting), None)
  k = layer_names[qa.contracting[0]] if qa.contracting else None

  def spec(per_layer):
    parts = list(per_layer)
    if stack_axis is not None:
      parts.insert(stack_axis, stack_name)
    return P(*parts)

  spec_vk = spec((out, k))
  return dataclasses.replace(qa, values=spec_vk, scale=spec((out, None)),
                             zero_point=None if qa.zero_point is None else spec_vk,
                             tensor_scale=None if qa.tensor_scale is None else P())
