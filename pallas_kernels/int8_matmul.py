"""W8A8 matmul: int8 activations x int8 weights -> int32 accumulator -> fused float epilogue.

``y = act(acc * x_scale[:, None] * w_scale[None, :] + bias)`` with ``acc = x @ w`` summed
exactly in int32 over K blocks in a scratch accumulator (TPU: VMEM scratch over the
"arbitrary" K grid axis; GPU: a loop inside the program), then scaled once. TPU v4's MXU has
no int8 mode: there each K tile (at most 1024 deep) is converted to bf16 in VMEM and summed in
f32 on the bf16 MXU, exact because every partial sum is an integer below 2**24, then added to
the int32 accumulator (the same bits as an int8 MXU, at the bf16 rate). With
``out_dtype=jnp.int32`` and no scales the raw accumulator is returned (what the tests compare
bit for bit).

Three implementations behind one signature: ``backend="tpu"`` (Pallas Mosaic), ``"gpu"``
(Pallas Triton), ``"xla"`` (the reference: `jax.lax.dot_general` with an int32 result, the
same epilogue). Ragged shapes are zero-padded to the tiles (exact: zeros add nothing to an
integer dot) and the result sliced back.

A float ``x`` is quantized inside the kernel, tile by tile as it is loaded, with its per-row
``x_scale``: ``clip(round(x / x_scale), -q, q)`` (round half to even, ``q = 2**(x_bits-1) - 1``),
the grid `jaxcomp.quant.dot` uses for activations. The int8 activations then never exist in
HBM: XLA materializes every int8 conversion as a pass of its own (it does not fuse one into
the dot that reads it), which is the pass this saves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import tiling

Array = jax.Array


def _epilogue(acc: Array, xs: Array | None, ws: Array | None, bias: Array | None,
              activation: str | None, out_dtype) -> Array:
  if out_dtype == jnp.int32:
    return acc
  y = acc.astype(jnp.float32)
  if xs is not None:
    y = y * xs
  if ws is not None:
    y = y * ws
  if bias is not None:
    y = y + bias
  return cm.apply_activation(y, activation).astype(out_dtype)


def quantize_rows(x: Array, x_scale: Array, bits: int = 8, *,
                  floor_round: bool = False) -> Array:
  """``clip(round(x / x_scale), -q, q)`` as int8 (``q = 2**(bits-1) - 1``, round half to
  even): the in-kernel quantization of a float ``x`` ``(M, K)`` with per-row scales ``(M, 1)``.
  ``floor_round`` rounds from ``floor`` (ties moved to the even neighbour), for Triton, which
  has no rounding op; the result is the same.

  Example:
    >>> quantize_rows(jnp.array([[0.5, 1.5, -300.0]]), jnp.array([[1.0]]))
    Array([[   0,    2, -127]], dtype=int8)
  """
  q = float(2 ** (bits - 1) - 1)
  v = x.astype(jnp.float32) / x_scale
  if floor_round:  # v - floor(v) is exact in float32: no double rounding near the ties
    r = jnp.floor(v)
    frac = v - r
    odd = r - 2.0 * jnp.floor(r * 0.5) == 1.0
    v = jnp.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
  else:
    v = jnp.round(v)
  return jnp.clip(v, -q, q).astype(jnp.int8)


def int8_matmul_reference(x: Array, w: Array, x_scale: Array | None = None,
                          w_scale: Array | None = None, bias: Array | None = None, *,
                          activation: str | None = None, out_dtype=jnp.bfloat16,
                          w_layout: str = "kn", x_bits: int = 8) -> Array:
  """The XLA path of `int8_matmul` (same arguments, same result)."""
  dims = (((1,), (0,)), ((), ())) if w_layout == "kn" else (((1,), (1,)), ((), ()))
  if x.dtype != jnp.int8:
    x = quantize_rows(x, x_scale.reshape(-1, 1).astype(jnp.float32), x_bits)
  acc = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)
  xs = None if x_scale is None else x_scale.reshape(-1, 1).astype(jnp.float32)
  ws = None if w_scale is None else w_scale.reshape(1, -1).astype(jnp.float32)
  b = None if bias is None else bias.reshape(1, -1).astype(jnp.float32)
  return _epilogue(acc, xs, ws, b, activation, out_dtype)


def _check(x, w, x_scale, w_scale, bias, activation, out_dtype, w_layout) -> tuple[int, int, int]:
  cm.check(getattr(x, "ndim", 0) == 2 and getattr(w, "ndim", 0) == 2,
           f"int8_matmul: x and w must be 2-D, got shapes {jnp.shape(x)} and {jnp.shape(w)}")
  cm.check(x.dtype == jnp.int8 or (jnp.issubdtype(x.dtype, jnp.floating)
                                   and x_scale is not None),
           f"int8_matmul: x must be int8, or float with x_scale (quantized in the kernel); "
           f"got {x.dtype}{'' if x_scale is not None else ' and no x_scale'}")
  cm.check(w.dtype == jnp.int8, f"int8_matmul: w must be int8, got {w.dtype}")
  cm.check(w_layout in ("kn", "nk"), f"int8_matmul: w_layout must be 'kn' or 'nk', got "
           f"{w_layout!r}")
  m, k = x.shape
  kw, n = w.shape if w_layout == "kn" else w.shape[::-1]
  cm.check(k == kw, f"int8_matmul: K mismatch: x is {x.shape}, w ({w_layout}) is {w.shape}")
  for name, v, size in (("x_scale", x_scale, m), ("w_scale", w_scale, n), ("bias", bias, n)):
    if v is not None:
      cm.check(v.size == size and v.ndim <= 2,
               f"int8_matmul: {name} must hold {size} values, got shape {v.shape}")
      cm.check(jnp.issubdtype(v.dtype, jnp.floating),
               f"int8_matmul: {name} must be a float array, got {v.dtype}")
  cm.check(activation in cm.ACTIVATIONS, f"int8_matmul: activation must be one of "
           f"{cm.ACTIVATIONS}, got {activation!r}")
  if jnp.dtype(out_dtype) == jnp.int32:
    cm.check((x_scale is None or x.dtype != jnp.int8) and w_scale is None and bias is None
             and activation is None,
             "int8_matmul: out_dtype=int32 returns the raw accumulator: pass no scales, "
             "bias or activation (an x_scale only to quantize a float x)")
  else:
    cm.check(jnp.issubdtype(out_dtype, jnp.floating),
             f"int8_matmul: out_dtype must be a float type or int32, got {out_dtype}")
  return m, n, k


def int8_matmul(x: Array, w: Array, x_scale: Array | None = None, w_scale: Array | None = None,
                bias: Array | None = None, *, activation: str | None = None,
                out_dtype=jnp.bfloat16, w_layout: str = "kn", x_bits: int = 8,
                backend: str | None = None, interpret: bool | None = None,
                blocks: tiling.Blocks | None = None) -> Array:
  """int8 x int8 matmul with an int32 accumulator and a fused scale / bias / activation.

  Args:
    x: int8 ``(M, K)`` activations (quantized per row: ``x_scale``), or float ``(M, K)``
      activations, quantized in the kernel with ``x_scale`` (`quantize_rows`).
    w: int8 weights, ``(K, N)`` (``w_layout="kn"``) or ``(N, K)`` (``"nk"``, the layout of a
      `jaxcomp.QArray`).
    x_scale: float ``(M,)`` or ``(M, 1)`` per-row activation scale, or None.
    w_scale: float ``(N,)`` or ``(1, N)`` per-column weight scale, or None.
    bias: float ``(N,)``, or None.
    activation: None, "relu", "gelu" or "silu", applied after scale and bias.
    out_dtype: float output type, or ``jnp.int32`` for the raw accumulator (no epilogue).
    w_layout: "kn" or "nk".
    x_bits: the grid a float ``x`` is quantized to (2..8 bits, symmetric).
    backend: "tpu" (Mosaic kernel), "gpu" (Triton kernel), "xla" (reference) or None:
      ``$JAXCOMP_KERNEL_BACKEND``, else the default device's platform.
    interpret: run the Pallas kernel in the interpreter (default: when its hardware is absent).
    blocks: tile sizes (default: `tiling.tpu_blocks` / `tiling.gpu_blocks`).

  Returns:
    ``(M, N)`` in ``out_dtype``.

  Example:
    >>> x = jnp.ones((4, 256), jnp.int8); w = jnp.ones((256, 128), jnp.int8)
    >>> int8_matmul(x, w, out_dtype=jnp.int32, backend="xla")[0, 0]
    Array(256, dtype=int32)
  """
  m, n, k = _check(x, w, x_scale, w_scale, bias, activation, out_dtype, w_layout)
  cm.check(isinstance(x_bits, int) and 2 <= x_bits <= 8,
           f"int8_matmul: x_bits must be an int in 2..8, got {x_bits!r}")
  out_dtype = jnp.dtype(out_dtype)
  backend = cm.resolve_backend(backend)
  if backend == "xla":
    return int8_matmul_reference(x, w, x_scale, w_scale, bias, activation=activation,
                                 out_dtype=out_dtype, w_layout=w_layout, x_bits=x_bits)
  quantize = x.dtype != jnp.int8
  interpret = cm.resolve_interpret(interpret, backend)
  generation = tiling.current_generation()
  int8_mxu = tiling.chip(generation).int8_mxu if backend == "tpu" else True
  if blocks is None:
    blocks = (tiling.tpu_blocks(generation, m=m, n=n, k=k, out_bytes=out_dtype.itemsize,
                                k_max=None if int8_mxu else _BF16_TK_MAX, **tpu_tile_bytes(
                                    generation, x.dtype))
              if backend == "tpu" else tiling.gpu_blocks(m, n, k))
  elif backend == "tpu":
    tiling.check_tpu_blocks("int8_matmul", generation, blocks, out_bytes=out_dtype.itemsize,
                            **tpu_tile_bytes(generation, x.dtype))
    cm.check(int8_mxu or blocks.tk <= _BF16_TK_MAX,
             f"int8_matmul: tk={blocks.tk} on {generation} (no int8 MXU: bf16 tiles, exact "
             f"only for tk <= {_BF16_TK_MAX})")
  tm, tn, tk = blocks.tm, blocks.tn, blocks.tk
  mp, np_, kp = cm.round_up(m, tm), cm.round_up(n, tn), cm.round_up(k, tk)
  xp = cm.pad_to(x, (mp, kp))
  wp = cm.pad_to(w, (kp, np_) if w_layout == "kn" else (np_, kp))
  xs = None if x_scale is None else x_scale.reshape(-1, 1).astype(jnp.float32)
  if xs is not None:  # padded rows get scale 1 (0 / 0 would quantize them from NaN)
    xs = jnp.pad(xs, ((0, mp - m), (0, 0)), constant_values=1.0)
  ws = None if w_scale is None else cm.pad_to(w_scale.reshape(1, -1).astype(jnp.float32),
                                              (1, np_))
  b = None if bias is None else cm.pad_to(bias.reshape(1, -1).astype(jnp.float32), (1, np_))
  kw = dict(blocks=blocks, activation=activation, out_dtype=out_dtype, w_layout=w_layout,
            interpret=cm.interpret_arg(backend, interpret),
            x_bits=x_bits if quantize else None)
  y = (_tpu_call(xp, wp, xs, ws, b, int8_mxu=int8_mxu, **kw) if backend == "tpu"
       else _gpu_call(xp, wp, xs, ws, b, **kw))
  return y[:m, :n]


# Without an int8 MXU (v4) the tiles are converted to bf16 in VMEM: K tiles of at most 1024
# keep each tile's f32 sum exact (|sum| <= 1024 * 128**2 = 2**24).
_BF16_TK_MAX = 1024


def tpu_tile_bytes(generation: str, x_dtype: object = jnp.int8) -> dict[str, float]:
  """The per-element byte counts `tiling.tpu_blocks` / `tiling.roofline` take for this
  kernel on ``generation``: int8 operands, and on v4 (no int8 MXU) the bf16 copies of both
  tiles and the f32 partial sum, its int32 cast and the new accumulator. A float ``x_dtype``
  (quantized in the kernel) is read at its own width and leaves a float32 quotient and an
  int8 tile in VMEM.

  Example:
    >>> tpu_tile_bytes("v4")["x_temp_bytes"]
    2
    >>> tpu_tile_bytes("v5e", jnp.bfloat16)["x_bytes"]
    2
  """
  x_bytes = jnp.dtype(x_dtype).itemsize
  quant_temp = 0 if jnp.dtype(x_dtype) == jnp.int8 else 5
  if tiling.chip(generation).int8_mxu:
    return dict(x_bytes=x_bytes, w_bytes=1, x_temp_bytes=quant_temp)
  return dict(x_bytes=x_bytes, w_bytes=1, w_temp_bytes=2, x_temp_bytes=2 + quant_temp,
              acc_temp_bytes=12)


def _operands(xs, ws, b):
  """The optional epilogue operands present, and a function putting them back in order."""
  present = [v is not None for v in (xs, ws, b)]
  args = [v for v in (xs, ws, b) if v is not None]

  def unpack(refs):
    it = iter(refs)
    return [next(it) if p else None for p in present]

  return args, unpack


def _cost(mp, np_, kp, out_dtype, n_epi, x_bytes=1) -> pl.CostEstimate:
  return pl.CostEstimate(flops=2 * mp * np_ * kp, transcendentals=0,
                         bytes_accessed=mp * kp * x_bytes + kp * np_
                         + mp * np_ * out_dtype.itemsize + 4 * n_epi * (mp + np_))


def _tpu_call(xp, wp, xs, ws, b, *, blocks, activation, out_dtype, w_layout, interpret,
              x_bits=None, int8_mxu=True):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  (mp, kp), tm, tn, tk = xp.shape, blocks.tm, blocks.tn, blocks.tk
  np_ = wp.shape[1] if w_layout == "kn" else wp.shape[0]
  grid = (mp // tm, np_ // tn, kp // tk)
  epi, unpack = _operands(xs, ws, b)
  dims = (((1,), (0,)), ((), ())) if w_layout == "kn" else (((1,), (1,)), ((), ()))

  def kernel(x_ref, w_ref, *refs):
    *epi_refs, o_ref, acc_ref = refs
    xs_ref, ws_ref, b_ref = unpack(epi_refs)

    @pl.when(pl.program_id(2) == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...] if x_bits is None else quantize_rows(x_ref[...], xs_ref[...], x_bits)
    if int8_mxu:
      acc_ref[...] += jax.lax.dot_general(x, w_ref[...], dims,
                                          preferred_element_type=jnp.int32)
    else:  # bf16 MXU: int8 values and this tile's f32 sum are exact; int32 across tiles
      part = jax.lax.dot_general(x.astype(jnp.bfloat16),
                                 w_ref[...].astype(jnp.bfloat16), dims,
                                 preferred_element_type=jnp.float32)
      acc_ref[...] += part.astype(jnp.int32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _store():
      o_ref[...] = _epilogue(acc_ref[...], None if xs_ref is None else xs_ref[...],
                             None if ws_ref is None else ws_ref[...],
                             None if b_ref is None else b_ref[...], activation, out_dtype)

  w_spec = (pl.BlockSpec((tk, tn), lambda i, j, kk: (kk, j)) if w_layout == "kn"
            else pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)))
  epi_specs = ([pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0))] if xs is not None else []) + [
      pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)) for v in (ws, b) if v is not None]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=grid,
      in_specs=[pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)), w_spec, *epi_specs],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(mp, np_, kp, out_dtype, len(epi), xp.dtype.itemsize),
      interpret=interpret,
      name="jaxcomp_int8_matmul",
  )(xp, wp, *epi)


def _gpu_call(xp, wp, xs, ws, b, *, blocks, activation, out_dtype, w_layout, interpret,
              x_bits=None):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  (mp, kp), tm, tn, tk = xp.shape, blocks.tm, blocks.tn, blocks.tk
  np_ = wp.shape[1] if w_layout == "kn" else wp.shape[0]
  epi, unpack = _operands(xs, ws, b)
  dims = (((1,), (0,)), ((), ())) if w_layout == "kn" else (((1,), (1,)), ((), ()))

  def kernel(x_ref, w_ref, *refs):
    *epi_refs, o_ref = refs
    xs_ref, ws_ref, b_ref = unpack(epi_refs)

    def body(kk, acc):
      x = x_ref[:, pl.ds(kk * tk, tk)]
      if x_bits is not None:
        x = quantize_rows(x, xs_ref[...], x_bits, floor_round=True)
      w = w_ref[pl.ds(kk * tk, tk), :] if w_layout == "kn" else w_ref[:, pl.ds(kk * tk, tk)]
      return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, kp // tk, body, jnp.zeros((tm, tn), jnp.int32))
    o_ref[...] = _epilogue(acc, None if xs_ref is None else xs_ref[...],
                           None if ws_ref is None else ws_ref[...],
                           None if b_ref is None else b_ref[...], activation, out_dtype)

  w_spec = (pl.BlockSpec((kp, tn), lambda i, j: (0, j)) if w_layout == "kn"
            else pl.BlockSpec((tn, kp), lambda i, j: (j, 0)))
  epi_specs = ([pl.BlockSpec((tm, 1), lambda i, j: (i, 0))] if xs is not None else []) + [
      pl.BlockSpec((1, tn), lambda i, j: (0, j)) for v in (ws, b) if v is not None]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // tm, np_ // tn),
      in_specs=[pl.BlockSpec((tm, kp), lambda i, j: (i, 0)), w_spec, *epi_specs],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      cost_estimate=_cost(mp, np_, kp, out_dtype, len(epi), xp.dtype.itemsize),
      interpret=interpret,
      name="jaxcomp_int8_matmul",
  )(xp, wp, *epi)
