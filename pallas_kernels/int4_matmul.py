"""W4A16 matmul: float activations x int4 weights packed two per byte, dequantized in-kernel.

Weight format (``"kn"``, rows = K): ``w_packed`` is int8 ``(K // 2, N)``; byte ``(r, n)``
holds ``q[2r, n] + 8`` in its low nibble (offset binary) and ``q[2r + 1, n]`` in its high nibble
(two's complement), q in [-8, 7], so the byte as int8 is ``16 q[2r + 1, n] + q[2r, n] + 8``
-- exactly the transpose of a `jaxcomp.QArray`'s packed ``(N, K // 2)`` values
(`jaxcomp.quant.pack_int4`). ``scales`` is ``(K // group, N)`` (one row per group of ``group`` consecutive K), or
``(1, N)`` per output channel (``group=None``). Optional ``zeros`` (asymmetric quantization)
are float32 of the same shape as ``scales``, integer-valued in [-8, 7]: the weight is
``(q - zeros) * scales``, both broadcast over each group along K; without ``zeros`` it is
``q * scales`` (symmetric) and the kernel takes no zero-point operand at all.

The kernel never interleaves nibbles: the low nibbles of a tile are the even rows of K and the
high nibbles the odd rows, so the activations are split once into their even and odd columns
(``x[:, 0::2]``, ``x[:, 1::2]``) and ``y = x_even @ deq(lo) + x_odd @ deq(hi)``. Each weight
tile is sign-extended, shifted by its group's zero point (if any) and scaled per group in f32
(TPU: the ``(tk/2, tn)`` tile viewed as ``(tk/group, group/2, tn)``, a sublane-aligned
reshape for group >= 32, with zeros tiled exactly like the scales, same BlockSpec; GPU: one
group per K step, one zero-point row like the scale row), cast to the activation dtype and
multiplied on the MXU / tensor cores with an f32 accumulator.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import tiling

Array = jax.Array
GROUPS = (32, 64, 128)
# VMEM per weight element of the in-kernel dequantization: the scaled f32 nibble and its
# cast to the activation dtype.
_DEQUANT_TEMP_BYTES = 6


def _nibbles(w: Array) -> tuple[Array, Array]:
  """Signed low / high nibbles of packed int8 bytes (module docstring), as int32."""
  v = w.astype(jnp.int32)  # sign-extends the byte: v = 16 hi + lo + 8, lo + 8 in [0, 15]
  return (v & 15) - 8, v >> 4


def unpack_kn(w_packed: Array) -> Array:
  """``(K // 2, N)`` packed bytes -> ``(K, N)`` int8 values (rows 2r, 2r + 1 from byte r).

  Example:
    >>> unpack_kn(jnp.array([[0x17]], jnp.int8)).ravel()
    Array([-1,  1], dtype=int8)
  """
  lo, hi = _nibbles(w_packed)
  kh, n = w_packed.shape
  return jnp.stack([lo, hi], axis=1).reshape(2 * kh, n).astype(jnp.int8)


def pack_kn(q: Array) -> Array:
  """Inverse of `unpack_kn`: int8 ``(K, N)`` in [-8, 7] (K even) -> int8 ``(K // 2, N)``.

  Example:
    >>> pack_kn(jnp.array([[-1], [1]], jnp.int8))
    Array([[23]], dtype=int8)
  """
  return (q[1::2].astype(jnp.int32) * 16 + q[0::2] + 8).astype(jnp.int8)


def int4_matmul_reference(x: Array, w_packed: Array, scales: Array, *, group: int | None,
                          zeros: Array | None = None, bias: Array | None = None,
                          activation: str | None = None, out_dtype=None) -> Array:
  """The XLA path of `int4_matmul` (same arguments, same result up to f32 summation order)."""
  q = unpack_kn(w_packed).astype(jnp.float32)

  def per_row(a):  # (K // group, N) or (1, N) -> broadcastable against q's (K, N)
    a = a.astype(jnp.float32)
    return jnp.repeat(a, group, axis=0)[:q.shape[0]] if group else a

  if zeros is not None:
    q = q - per_row(zeros)
  w = (q * per_row(scales)).astype(x.dtype)
  y = jnp.dot(x, w, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.reshape(1, -1).astype(jnp.float32)
  return cm.apply_activation(y, activation).astype(out_dtype or x.dtype)


def _check(x, w_packed, scales, group, bias, activation, out_dtype,
           zeros=None) -> tuple[int, int, int]:
  cm.check(getattr(x, "ndim", 0) == 2 and getattr(w_packed, "ndim", 0) == 2,
           f"int4_matmul: x and w_packed must be 2-D, got {jnp.shape(x)} and "
           f"{jnp.shape(w_packed)}")
  cm.check(x.dtype in (jnp.bfloat16, jnp.float32, jnp.float16),
           f"int4_matmul: x must be bfloat16, float16 or float32, got {x.dtype}")
  cm.check(w_packed.dtype == jnp.int8,
           f"int4_matmul: w_packed must be int8 (two int4 a byte, pack_kn's layout), got "
           f"{w_packed.dtype}")
  m, k = x.shape
  kh, n = w_packed.shape
  cm.check(k == 2 * kh, f"int4_matmul: K mismatch: x is {x.shape} (K={k}) but w_packed "
           f"{w_packed.shape} holds K={2 * kh} rows")
  if group is not None:
    cm.check(isinstance(group, int) and group in GROUPS,
             f"int4_matmul: group must be one of {GROUPS} or None, got {group!r}")
    cm.check(k % group == 0, f"int4_matmul: group {group} does not divide K={k}")
  expected = (k // group if group else 1, n)
  cm.check(getattr(scales, "shape", None) == expected,
           f"int4_matmul: scales must have shape {expected}, got {jnp.shape(scales)}")
  cm.check(jnp.issubdtype(scales.dtype, jnp.floating),
           f"int4_matmul: scales must be a float array, got {scales.dtype}")
  if zeros is not None:
    cm.check(getattr(zeros, "shape", None) == expected,
             f"int4_matmul: zeros must have shape {expected} (the shape of scales), got "
             f"{jnp.shape(zeros)}")
    cm.check(jnp.issubdtype(zeros.dtype, jnp.floating),
             f"int4_matmul: zeros must be a float array (integer values in [-8, 7]), got "
             f"{zeros.dtype}")
  if bias is not None:
    cm.check(bias.size == n, f"int4_matmul: bias must hold {n} values, got {bias.shape}")
  cm.check(activation in cm.ACTIVATIONS, f"int4_matmul: activation must be one of "
           f"{cm.ACTIVATIONS}, got {activation!r}")
  if out_dtype is not None:
    cm.check(jnp.issubdtype(out_dtype, jnp.floating),
             f"int4_matmul: out_dtype must be a float type, got {out_dtype}")
  return m, n, k


def int4_matmul(x: Array, w_packed: Array, scales: Array, *, group: int | None,
                zeros: Array | None = None, bias: Array | None = None,
                activation: str | None = None, out_dtype=None, backend: str | None = None,
                interpret: bool | None = None, blocks: tiling.Blocks | None = None) -> Array:
  """``x @ dequant(w_packed, scales[, zeros])`` with int4 weights unpacked and scaled in-kernel.

  The dequantized weight is ``q * scales`` (symmetric), or ``(q - zeros) * scales`` with
  zero points (asymmetric), each row of ``scales`` / ``zeros`` covering ``group``
  consecutive K.

  Args:
    x: ``(M, K)`` activations, bf16 (or f16 / f32).
    w_packed: int8 ``(K // 2, N)``, two int4 a byte along K (module docstring).
    scales: float ``(K // group, N)``, or ``(1, N)`` with ``group=None``.
    group: 32, 64 or 128 consecutive K per scale (must divide K), or None (per channel).
    zeros: float32 zero points, the shape of ``scales`` (``(K // group, N)`` or ``(1, N)``),
      integer values in [-8, 7]; None (default) for symmetric weights.
    bias: float ``(N,)`` or None; activation: None, "relu", "gelu", "silu".
    out_dtype: output dtype (default ``x.dtype``); the accumulator is f32.
    backend, interpret, blocks: as for `pallas_kernels.int8_matmul`.

  Returns:
    ``(M, N)``.

  Example:
    >>> x = jnp.ones((2, 64), jnp.bfloat16)
    >>> w = pack_kn(jnp.ones((64, 128), jnp.int8)); s = jnp.full((2, 128), 0.5)
    >>> int4_matmul(x, w, s, group=32, backend="xla")[0, 0]
    Array(32, dtype=bfloat16)
    >>> z = jnp.full((2, 128), -1.0)  # asymmetric: each weight is (1 - (-1)) * 0.5 = 1
    >>> int4_matmul(x, w, s, group=32, zeros=z, backend="xla")[0, 0]
    Array(64, dtype=bfloat16)
  """
  m, n, k = _check(x, w_packed, scales, group, bias, activation, out_dtype, zeros)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  backend = cm.resolve_backend(backend)
  if backend == "xla":
    return int4_matmul_reference(x, w_packed, scales, group=group, zeros=zeros, bias=bias,
                                 activation=activation, out_dtype=out_dtype)
  interpret = cm.resolve_interpret(interpret, backend)
  if blocks is None:
    blocks = _tpu_blocks(m, n, k, group, x.dtype) if backend == "tpu" else tiling.gpu_blocks(
        m, n, k, tk=group or 64)  # one group per K step: a (1, tn) scale row
  elif backend == "tpu":
    tiling.check_tpu_blocks("int4_matmul", tiling.current_generation(), blocks,
                            x_bytes=jnp.dtype(x.dtype).itemsize, w_bytes=0.5,
                            out_bytes=out_dtype.itemsize, w_temp_bytes=_DEQUANT_TEMP_BYTES)
  tm, tn, tk = blocks.tm, blocks.tn, blocks.tk
  cm.check(tk % 2 == 0 and (group is None or tk % group == 0),
           f"int4_matmul: blocks.tk={tk} must be even and a multiple of group {group}")
  mp, np_, kp = cm.round_up(m, tm), cm.round_up(n, tn), cm.round_up(k, tk)
  xp = cm.pad_to(x, (mp, kp))
  x_even, x_odd = xp[:, 0::2], xp[:, 1::2]
  wp = cm.pad_to(w_packed, (kp // 2, np_))
  s_rows = kp // group if group else 1
  sp = cm.pad_to(scales.astype(jnp.float32), (s_rows, np_))
  # Padded K rows / N columns hold q = 0 with scale 0, so a zero point of 0 there is exact.
  zp = None if zeros is None else cm.pad_to(zeros.astype(jnp.float32), (s_rows, np_))
  b = None if bias is None else cm.pad_to(bias.reshape(1, -1).astype(jnp.float32), (1, np_))
  run = _tpu_call if backend == "tpu" else _gpu_call
  y = run(x_even, x_odd, wp, sp, zp, b, group=group, blocks=blocks, activation=activation,
          out_dtype=out_dtype, interpret=cm.interpret_arg(backend, interpret))
  return y[:m, :n]


def _tpu_blocks(m: int, n: int, k: int, group: int | None, dtype) -> tiling.Blocks:
  """TPU tiles: ``tk/2`` lanes of packed bytes a multiple of 128 (tk % 256), and per-group
  scale tiles of ``tk/group`` rows a multiple of 8 -- or the whole K in one step. The
  roofline counts neither the f32 scale tiles nor the zero-point tiles of the same size
  (``4 / group`` bytes per weight element each, against the packed weight's 1/2)."""
  single = cm.round_up(k, math.lcm(256, group or 1))
  multi = math.lcm(256, 8 * group) if group else 256
  if single <= multi:
    b = tiling.tpu_blocks(tiling.current_generation(), m=m, n=n, k=single,
                          x_bytes=jnp.dtype(dtype).itemsize, w_bytes=0.5, k_align=single,
                          row_align=16, peak="bf16", w_temp_bytes=_DEQUANT_TEMP_BYTES)
    return tiling.Blocks(b.tm, b.tn, single)
  return tiling.tpu_blocks(tiling.current_generation(), m=m, n=n, k=k,
                           x_bytes=jnp.dtype(dtype).itemsize, w_bytes=0.5, k_align=multi,
                           row_align=16, peak="bf16", w_temp_bytes=_DEQUANT_TEMP_BYTES)


def _dequant(w: Array, s: Array, z: Array | None, group: int | None,
             dtype) -> tuple[Array, Array]:
  """Sign-extended low / high nibble tiles ``(tkp, tn)``, less their group's zero point ``z``
  (None: symmetric), scaled by ``s`` in f32 and cast to ``dtype``. ``s`` and ``z`` are
  ``(gt, tn)`` rows, one per group of the tile (``(1, tn)`` per channel)."""
  lo, hi = _nibbles(w)
  tkp, tn = w.shape

  def scale(q):
    q = q.astype(jnp.float32)
    if group is None or s.shape[0] == 1:
      if z is not None:
        q = q - z
      return (q * s).astype(dtype)
    gt = s.shape[0]
    q = q.reshape(gt, tkp // gt, tn)
    if z is not None:
      q = q - z[:, None, :]
    return (q * s[:, None, :]).reshape(tkp, tn).astype(dtype)

  return scale(lo), scale(hi)


def _cost(mp, np_, kp, x_bytes, out_dtype) -> pl.CostEstimate:
  return pl.CostEstimate(flops=2 * mp * np_ * kp, transcendentals=0,
                         bytes_accessed=int(mp * kp * x_bytes + kp * np_ // 2
                                            + mp * np_ * out_dtype.itemsize))


def _finish(acc, b_ref, activation, out_dtype):
  if b_ref is not None:
    acc = acc + b_ref[...]
  return cm.apply_activation(acc, activation).astype(out_dtype)


def _tpu_call(x_even, x_odd, wp, sp, zp, b, *, group, blocks, activation, out_dtype,
              interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  (mp, kh), tm, tn, tk = x_even.shape, blocks.tm, blocks.tn, blocks.tk
  np_, tkp = wp.shape[1], tk // 2
  gt = tk // group if group else 1
  grid = (mp // tm, np_ // tn, kh // tkp)
  per_step_scales = group is not None

  def kernel(xe_ref, xo_ref, w_ref, s_ref, *refs):
    z_ref = refs[0] if zp is not None else None
    b_ref = refs[int(zp is not None)] if b is not None else None
    o_ref, acc_ref = refs[-2], refs[-1]

    @pl.when(pl.program_id(2) == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    z = z_ref[...] if z_ref is not None else None
    lo, hi = _dequant(w_ref[...], s_ref[...], z, group, xe_ref.dtype)
    acc_ref[...] += (jnp.dot(xe_ref[...], lo, preferred_element_type=jnp.float32)
                     + jnp.dot(xo_ref[...], hi, preferred_element_type=jnp.float32))

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _store():
      o_ref[...] = _finish(acc_ref[...], b_ref, activation, out_dtype)

  s_spec = (pl.BlockSpec((gt, tn), lambda i, j, kk: (kk, j)) if per_step_scales
            else pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
  z_specs = [s_spec] if zp is not None else []  # zero points tile exactly like the scales
  b_specs = [pl.BlockSpec((1, tn), lambda i, j, kk: (0, j))] if b is not None else []
  x_spec = pl.BlockSpec((tm, tkp), lambda i, j, kk: (i, kk))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=grid,
      in_specs=[x_spec, x_spec, pl.BlockSpec((tkp, tn), lambda i, j, kk: (kk, j)), s_spec,
                *z_specs, *b_specs],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(mp, np_, 2 * kh, x_even.dtype.itemsize, out_dtype),
      interpret=interpret,
      name="jaxcomp_int4_matmul",
  )(x_even, x_odd, wp, sp, *([zp] if zp is not None else []), *([b] if b is not None else []))


def _gpu_call(x_even, x_odd, wp, sp, zp, b, *, group, blocks, activation, out_dtype,
              interpret):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  (mp, kh), tm, tn, tk = x_even.shape, blocks.tm, blocks.tn, blocks.tk
  np_, tkp = wp.shape[1], tk // 2
  gt = tk // group if group else 1
  n_groups = sp.shape[0]

  def kernel(xe_ref, xo_ref, w_ref, s_ref, *refs):
    z_ref = refs[0] if zp is not None else None
    b_ref = refs[int(zp is not None)] if b is not None else None
    o_ref = refs[-1]

    def groups(ref, kk):  # this K step's rows of the scales / zero points
      return ref[pl.ds(kk * gt, gt), :] if group else ref[...]

    def body(kk, acc):
      rows = pl.ds(kk * tkp, tkp)
      s = groups(s_ref, kk)
      z = groups(z_ref, kk) if z_ref is not None else None
      lo, hi = _dequant(w_ref[rows, :], s, z, group, xe_ref.dtype)
      return (acc + jnp.dot(xe_ref[:, rows], lo, preferred_element_type=jnp.float32)
              + jnp.dot(xo_ref[:, rows], hi, preferred_element_type=jnp.float32))

    acc = jax.lax.fori_loop(0, kh // tkp, body, jnp.zeros((tm, tn), jnp.float32))
    o_ref[...] = _finish(acc, b_ref, activation, out_dtype)

  s_spec = pl.BlockSpec((n_groups, tn), lambda i, j: (0, j))
  z_specs = [s_spec] if zp is not None else []  # zero points tile exactly like the scales
  b_specs = [pl.BlockSpec((1, tn), lambda i, j: (0, j))] if b is not None else []
  x_spec = pl.BlockSpec((tm, kh), lambda i, j: (i, 0))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // tm, np_ // tn),
      in_specs=[x_spec, x_spec, pl.BlockSpec((kh, tn), lambda i, j: (0, j)), s_spec,
                *z_specs, *b_specs],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      cost_estimate=_cost(mp, np_, 2 * kh, x_even.dtype.itemsize, out_dtype),
      interpret=interpret,
      name="jaxcomp_int4_matmul",
  )(x_even, x_odd, wp, sp, *([zp] if zp is not None else []), *([b] if b is not None else []))
