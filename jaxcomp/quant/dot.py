"""The quantized ``dot_general``: the one place where a quantized matmul is computed.

Every quantized layer (linear, general linear, einsum, tied embedding head) ends here. Operands
are first brought to a canonical frame, ``lhs -> (B, M, K)`` and ``rhs -> (B, K, N)`` (B the
batch dims, M/N the free dims, K the contracting dims, each flattened), where granularity has
one meaning for every layer type: per-token activation scales reduce over K per (b, m);
per-channel weight scales reduce over K per (b, n); per-group weight scales reduce over
consecutive runs of ``group`` elements of K.

When both operands are quantized on symmetric grids, the forward pass runs a real
``int8 x int8 -> int32`` dot and rescales once (AQT-style). With ``Quant.g_bits`` the two
backward dots run in int8 as well: the output gradient is quantized per row for
``d lhs = G W^T`` and per column for ``d rhs = X^T G``, the other operand re-quantized along
the matching axis. The gradient seen by the float inputs is the straight-through estimator of
the fake-quantized product, so QAT and this path share their numerics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxcomp.quant import core
from jaxcomp.quant import formats
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import Quant, SpecError, weight_scale_shape  # noqa: F401 (re-export)

Array = jax.Array
DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


# --------------------------------------------------------------------------- canonical frame


class _Frame:
  """Index bookkeeping that maps a dot_general to (B, M, K) x (B, K, N) and back."""

  def __init__(self, lhs_shape, rhs_shape, dimension_numbers: DimensionNumbers):
    (lc, rc), (lb, rb) = dimension_numbers
    nl, nr = len(lhs_shape), len(rhs_shape)
    self.lc = tuple(a % nl for a in lc)
    self.rc = tuple(a % nr for a in rc)
    self.lb = tuple(a % nl for a in lb)
    self.rb = tuple(a % nr for a in rb)
    if len(self.lc) != len(self.rc) or len(self.lb) != len(self.rb):
      raise ValueError(f"dot_general: unpaired dimension numbers {dimension_numbers}")
    for a, b in zip(self.lc, self.rc):
      if lhs_shape[a] != rhs_shape[b]:
        raise ValueError(
            f"dot_general: contracting dims differ: lhs{tuple(lhs_shape)} axis {a} vs "
            f"rhs{tuple(rhs_shape)} axis {b}")
    self.lf = tuple(a for a in range(nl) if a not in self.lc + self.lb)
    self.rf = tuple(a for a in range(nr) if a not in self.rc + self.rb)
    self.batch_shape = tuple(lhs_shape[a] for a in self.lb)
    self.m_shape = tuple(lhs_shape[a] for a in self.lf)
    self.n_shape = tuple(rhs_shape[a] for a in self.rf)
    self.k_shape = tuple(lhs_shape[a] for a in self.lc)
    self.B = math.prod(self.batch_shape)
    self.M = math.prod(self.m_shape)
    self.N = math.prod(self.n_shape)
    self.K = math.prod(self.k_shape)

  def lhs(self, x: Array) -> Array:
    return jnp.transpose(x, self.lb + self.lf + self.lc).reshape(self.B, self.M, self.K)

  def rhs(self, w: Array) -> Array:
    """(B, Kc, N) for the kernel or a kernel-layout scale (contracting dims may be size 1)."""
    t = jnp.transpose(w, self.rb + self.rc + self.rf)
    size = lambda axes: math.prod(w.shape[a] for a in axes)
    return t.reshape(size(self.rb), size(self.rc), size(self.rf))

  def out(self, y: Array) -> Array:
    return y.reshape(self.batch_shape + self.m_shape + self.n_shape)


# --------------------------------------------------------------------------- operand grids


# One program per weight shape and spec: called eagerly (a model run outside jit, `convert`),
# its ops would each compile per shape; inside a traced function it inlines as before.
@functools.partial(jax.jit, static_argnums=1)
def _weight_grid(w3: Array, spec: Quant, step3: Array | None,
                 zero3: Array | None = None) -> tuple[Array, Array]:
  """Integer-valued grid ``u`` and scale ``s`` of a canonical (B, K, N) weight.

  Per group the result is (B, G, g, N) with scale (B, G, 1, N); otherwise (B, K, N), (B, 1, N)
  (or (1, 1, 1) per tensor).
  """
  b, k, n = w3.shape
  if spec.granularity == "group":
    if k % spec.group and spec.calibration != "absmax":
      raise SpecError(f"Quant.group={spec.group} does not divide the contraction size {k}; a "
                      "shorter last group needs calibration='absmax'")
    w3 = core.pad_to_groups(w3, 1, spec.group)
    w3 = w3.reshape(b, w3.shape[1] // spec.group, spec.group, n)
    axes = (2,)
    if step3 is not None:
      step3 = step3.reshape(b, w3.shape[1], 1, n)
    if zero3 is not None:
      zero3 = zero3.reshape(b, w3.shape[1], 1, n)
  elif spec.granularity == "channel":
    axes = (1,)
  else:
    axes = None
  if step3 is not None:  # LSQ: the step is a trained parameter.
    g = core.lsq_grad_scale(w3.size, step3.size, spec.w_bits, spec.w_symmetric,
                            spec.full_range)
    s, z = core.grad_scale(step3, g), zero3  # a solved asymmetric grid brings its zero points
  else:
    s, z = core.compute_scale(w3, spec.w_bits, axes=axes, symmetric=spec.w_symmetric,
                              calibration=spec.calibration, percentile=spec.percentile,
                              full_range=spec.full_range, fmt=spec.w_format,
                              scale_dtype=spec.scale_dtype)
    s = jax.lax.stop_gradient(s)
  # Symmetric absmax scales clip nothing on the narrow grid; the full grid clips +absmax.
  exact = (step3 is None and spec.calibration == "absmax" and spec.w_symmetric
           and not spec.full_range)
  return core.grid_value(w3, s, z, spec.w_bits, spec.w_symmetric, clip=not exact,
                         full_range=spec.full_range, fmt=spec.w_format), s


@functools.partial(jax.jit, static_argnums=1)  # one program per shape and spec (as _weight_grid)
def _act_grid(x3: Array, spec: Quant, amax_history: Array | None = None
              ) -> tuple[Array, Array]:
  """Grid of a canonical (B, M, K) activation: dynamic per token (B, M, 1) or per tensor, or
  (``scaling="delayed"``) per tensor from ``amax_history`` (values outside it clip)."""
  if spec.scaling == "delayed":
    s = jax.lax.stop_gradient(amax_scale(_history(amax_history)[0], spec.a_bits))
    return core.grid_value(x3, s, None, spec.a_bits), s
  axes = (2,) if spec.a_granularity == "token" else None
  s, z = core.compute_scale(x3, spec.a_bits, axes=axes, symmetric=spec.a_symmetric,
                            fmt=spec.a_format)
  s = jax.lax.stop_gradient(s)
  return core.grid_value(x3, s, z, spec.a_bits, spec.a_symmetric, clip=not spec.a_symmetric,
                         fmt=spec.a_format), s


def _act_scale(x3: Array, spec: Quant, amax_history: Array | None = None) -> Array:
  """The scale `_act_grid` gives a symmetric activation grid, without the grid: (B, M, 1) per
  token, (1, 1, 1) per tensor (for kernels that quantize as they load)."""
  if spec.scaling == "delayed":
    return jax.lax.stop_gradient(amax_scale(_history(amax_history)[0], spec.a_bits))
  axes = (2,) if spec.a_granularity == "token" else None
  return jax.lax.stop_gradient(core.compute_scale(x3, spec.a_bits, axes=axes)[0])


def _history(amax_history: Array | None) -> Array:
  if amax_history is None:
    raise ValueError("Quant(scaling='delayed') needs the layer's amax history "
                     "(jaxcomp.AmaxHistory, made by jc.quantize); none was given")
  if amax_history.ndim != 2 or amax_history.shape[0] != 2:
    raise ValueError(f"amax history must be (2, steps), got shape {amax_history.shape}")
  return amax_history


def amax_scale(history: Array, bits: int) -> Array:
  """The delayed per-tensor scale: the largest absmax in ``history`` over ``qmax``.

  An empty history (all zeros: the layer was never calibrated, see `jaxcomp.calibrate_amax`)
  gives NaN, so an uncalibrated layer cannot pass for a trained one.

  Args:
    history: float (steps,) absmax of the tensor at the last steps (newest first).
    bits: the grid's bits (qmax = 2**(bits-1) - 1).

  Returns:
    float32 scalar.

  Example:
    >>> amax_scale(jnp.array([2.54, 1.0, 0.0]), 8)
    Array(0.02, dtype=float32)
  """
  m = jnp.max(history).astype(jnp.float32)
  return jnp.where(m > 0, m / core.qrange(bits)[1], jnp.nan)


def fake_quant_weight(
    w: Array, contracting: Sequence[int], spec: Quant, step: Array | None = None,
    zero: Array | None = None
) -> Array:
  """Fake-quantizes a kernel in its own layout, scales shared along ``contracting`` axes.

  Args:
    w: kernel of any rank, e.g. (K, N) dense, (H, W, Cin, Cout) conv, (V, D) embedding.
    contracting: the axes the layer contracts over (0 for dense, (0, 1, 2) for HWIO conv,
      1 for an embedding table used as ``x @ E.T``).
    spec: the quantization spec (w_bits, granularity, group, calibration, symmetry).
    step: optional LSQ step in the shape `weight_scale_shape` gives.
    zero: with ``step`` on an asymmetric grid (e.g. solved by GPTQ): its integer-valued zero
      points, shaped like ``step``.

  Returns:
    The fake-quantized kernel, same shape and dtype, with STE (and LSQ) gradients.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> fake_quant_weight(w, (0,), jc.Quant(w_bits=4)).shape
    (64, 32)
  """
  nd = w.ndim
  contracting = tuple(a % nd for a in contracting)
  free = tuple(a for a in range(nd) if a not in contracting)
  frame = _Frame((1,) + tuple(w.shape[a] for a in contracting), w.shape,
                 (((*range(1, len(contracting) + 1),), contracting), ((), ())))
  step3 = None if step is None else frame.rhs(step)
  zero3 = None if zero is None else frame.rhs(zero)
  u, s = _weight_grid(frame.rhs(w), spec, step3, zero3)
  w_hat = (u * s).reshape(1, -1, frame.N)[:, :frame.K]  # (a shorter last group is padded)
  t = w_hat.reshape(tuple(w.shape[a] for a in contracting + free))
  w_hat = jnp.transpose(t, np.argsort(contracting + free)).astype(w.dtype)
  if step is None and spec.calibration == "absmax" and spec.w_symmetric and not spec.full_range:
    # Nothing is clipped, so the STE is the identity: pass the gradient straight to ``w``
    # instead of through (x / s) * s, saving a weight-sized pass per step.
    return _straight_through(w, jax.lax.stop_gradient(w_hat))
  return w_hat


@jax.custom_vjp
def _straight_through(x: Array, x_hat: Array) -> Array:
  """``x_hat`` forward; the whole gradient goes to ``x`` (none to ``x_hat``)."""
  return x_hat


_straight_through.defvjp(lambda x, x_hat: (x_hat, None),
                         lambda _, g: (g, jnp.zeros_like(g)))


# --------------------------------------------------------------------------- the integer dot


def _int8(u: Array) -> Array:
  return u.astype(jnp.int8)


def kernel_backend(backend: str | None = None) -> str:
  """Where quantized dots run: "tpu" / "gpu" (the Pallas kernels of `pallas_kernels`) or
  "xla". ``backend`` (auto, tpu, gpu, xla) if given, else ``$JAXCOMP_KERNEL_BACKEND``, else auto
  (the default device). The quantized layers resolve this once, when they are built
  (`jaxcomp.quantize(..., backend=)`, `jaxcomp.convert(..., backend=)`), and pass the result to
  `quant_dot_general`, so nothing is read while a function is traced. A Pallas path forced on a
  host without its hardware runs in the Pallas interpreter (slow; for tests).

  Example:
    >>> kernel_backend("xla"), kernel_backend()  # on a CPU host, with the variable unset
    ('xla', 'xla')
  """
  return pallas_kernels.resolve_backend(backend)


def _idot(a: Array, b: Array, backend: str, *, b_transposed: bool = False) -> Array:
  """int8 (B, M, K) x int8 (B, K, N) -> int32 (B, M, N); ``b_transposed``: b is (B, N, K).

  Only these two layouts (contraction on the last axis of ``a``) reach the fast int8 GEMMs of
  XLA's CPU backend; a batch of one is dropped to a plain 2-D dot for the same reason.
  """
  a, b = _int8(a), _int8(b)
  if backend != "xla":  # the Pallas int8 kernel, one call per batch entry
    mm = functools.partial(pallas_kernels.int8_matmul, out_dtype=jnp.int32, backend=backend,
                           w_layout="nk" if b_transposed else "kn")
    return mm(a[0], b[0])[None] if a.shape[0] == 1 else jax.vmap(mm)(a, b)
  rc = 2 if b_transposed else 1
  if a.shape[0] == 1:
    y = jax.lax.dot_general(a[0], b[0], (((1,), (rc - 1,)), ((), ())),
                            preferred_element_type=jnp.int32)
    return y[None]
  return jax.lax.dot_general(a, b, (((2,), (rc,)), ((0,), (0,))),
                             preferred_element_type=jnp.int32)


def _swap_materialized(x: Array) -> Array:
  """(B, R, C) -> (B, C, R) as a real copy in row-major order.

  A bare transpose is folded by XLA into the consumer dot as a column-major operand, which on
  CPU falls off the fast int8 GEMM (about 40x slower); the flatten behind an optimization
  barrier forces the copy. On TPU/GPU this is a cheap relayout of int8 data.
  """
  b, r, c = x.shape
  flat = jax.lax.optimization_barrier(jnp.swapaxes(x, 1, 2).reshape(-1))
  return flat.reshape(b, c, r)


def _idot_tn(a: Array, b: Array, backend: str) -> Array:
  """int8 ``a^T b`` per batch entry: (B, M, K) x (B, M, N) -> int32 (B, K, N), contracting M
  (the weight gradient ``X^T G``), with one operand transposed first: the fast int8 GEMMs take
  the contraction on the minor axis of the left operand.

  On CPU (and for the Pallas kernels) the smaller operand is transposed, as a real copy on CPU
  (`_swap_materialized`), and a transposed ``G`` gives ``(G^T X)^T``. Compiled by XLA for TPU
  or GPU the result must come out in the kernel's own layout, or every optimizer update of that
  kernel runs on a transposed copy of its parameters and moments (24 copies of a 4-block MLP
  step on v5e): when ``G`` is the smaller operand it is transposed as a copy and the dot
  contracts ``X`` on its leading axis, which XLA relayouts once.
  """
  on_cpu = pallas_kernels.target_platform() == "cpu"
  if backend == "xla" and not on_cpu:
    if b.shape[2] < a.shape[2]:
      return jax.lax.dot_general(_int8(a), _swap_materialized(_int8(b)),
                                 (((1,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32)
    return _idot(_swap_materialized(a), b, backend)
  swap = _swap_materialized if on_cpu else lambda x: jnp.swapaxes(x, 1, 2)
  if b.shape[2] < a.shape[2]:
    return jnp.swapaxes(_idot(swap(b), a, backend), 1, 2)
  return _idot(swap(a), b, backend)


def _quant_rows(x: Array, axis: int, bits: int) -> tuple[Array, Array]:
  """Dynamic symmetric quantization of ``x`` with one scale per slice along ``axis``."""
  s, _ = core.compute_scale(x, bits, axes=axis)
  return core.quantize(x, s, bits=bits), s


def int_dot(u_x: Array, s_x: Array, u_w: Array, s_w: Array, g_bits: int | None,
            backend: str | None = None) -> Array:
  """``(u_x s_x) @ (u_w s_w)`` batched, with the product ``u_x @ u_w`` run in int8 -> int32.

  Backward (the STE of the float product), with ``G`` the output gradient:
  ``du_x = s_x ((G s_w) u_w^T)`` and ``du_w = s_w (u_x^T (s_x G))``: the operand scales move
  onto ``G``, so the int8 grids saved from the forward pass are reused as they are. With
  ``g_bits`` the scaled gradients are quantized (per row for ``du_x``, per column for ``du_w``)
  and both dots run in int8 too; otherwise they run in float32.

  Args:
    u_x: float (B, M, K), integer-valued in [-127, 127] (an activation grid).
    s_x: float (B, M, 1) per-row scales.
    u_w: float (B, K, N), integer-valued in [-127, 127] (a weight grid).
    s_w: float (B, 1, N) per-column scales.
    g_bits: None for float backward dots, else the bits of the quantized output gradient.
    backend: where the int8 products run (`kernel_backend`; None: resolved now).

  Returns:
    float32 (B, M, N). Gradients flow to all four arrays as for the float product.

  Example:
    >>> u = jnp.ones((1, 4, 8)); v = jnp.ones((1, 8, 2))
    >>> int_dot(u, jnp.full((1, 4, 1), 0.5), v, jnp.ones((1, 1, 2)), None)[0, 0]
    Array([4., 4.], dtype=float32)
  """
  return _int_dot(u_x, s_x, u_w, s_w, g_bits, kernel_backend(backend))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _int_dot(u_x, s_x, u_w, s_w, g_bits, backend):
  return _int_dot_fwd(u_x, s_x, u_w, s_w, g_bits, backend)[0]


def _int_dot_fwd(u_x, s_x, u_w, s_w, g_bits, backend):
  qx, qw = _int8(u_x), _int8(u_w)
  y = _idot(qx, qw, backend).astype(jnp.float32) * s_x * s_w
  return y, (qx, s_x, qw, s_w)


def _int_dot_bwd(g_bits, backend, res, g):
  qx, s_x, qw, s_w = res
  gw, gx = g * s_w, g * s_x  # (B, M, N): the scale of the other operand moved onto G
  if g_bits is None:
    dux = jnp.einsum("bmn,bkn->bmk", gw, qw.astype(jnp.float32))
    duw = jnp.einsum("bmk,bmn->bkn", qx.astype(jnp.float32), gx)
  else:
    qg, sg = _quant_rows(gw, 2, g_bits)  # per row: contracted over N
    dux = _idot(qg, qw, backend, b_transposed=True).astype(jnp.float32) * sg
    qg, sg = _quant_rows(gx, 1, g_bits)  # per column: contracted over M
    duw = _idot_tn(qx, qg, backend).astype(jnp.float32) * sg
  # dux = dL/dx_hat without the s_x factor (likewise duw): x_hat = u_x s_x.
  ds_x = jnp.sum(qx.astype(jnp.float32) * dux, axis=2, keepdims=True)
  ds_w = jnp.sum(qw.astype(jnp.float32) * duw, axis=1, keepdims=True)
  return (dux * s_x, _unbroadcast(ds_x, s_x.shape), duw * s_w, _unbroadcast(ds_w, s_w.shape))


def _unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
  axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(g, axis=axes, keepdims=True) if axes else g


_int_dot.defvjp(_int_dot_fwd, _int_dot_bwd)


def delayed_int_dot(u_x: Array, s_x: Array, u_w: Array, s_w: Array, amax_history: Array,
                    amax_x: Array, g_bits: int | None, backend: str | None = None,
                    calibrating: bool = False) -> Array:
  """`int_dot` with per-tensor activation and gradient scales from earlier steps (delayed
  scaling, as fp8 training recipes do).

  Forward as `int_dot` (``s_x`` one value per tensor). Backward with ``g_bits``: the output
  gradient ``G`` is quantized **once**, per tensor, with the scale ``amax_scale`` gives for
  the history's gradient row, and both backward dots read it: ``d lhs = G W^T`` against the
  weight re-quantized per row of ``W`` (per input feature: the output-channel scales lie on
  the contracted axis there) and ``d rhs = X^T G`` against the forward pass's int8 ``X``.
  Nothing waits for a reduction over a whole tensor before it rounds, so XLA fuses every
  quantization into the op producing its tensor (on TPU; docs/quantization.md).

  The cotangent of ``amax_history`` is not a gradient: it is the history with this step's
  absmax of ``X`` (``amax_x``) and of ``G`` pushed in front, which the training step writes
  back (`jaxcomp.amax_overwrite`). ``calibrating`` takes this step's own absmax for the
  gradient's scale instead (`jaxcomp.calibrate_amax`).

  Args:
    u_x: float (B, M, K), integer-valued (the activation grid on the delayed scale).
    s_x: float (B, M, 1), one value (the delayed scale, broadcast).
    u_w: float (B, K, N), integer-valued (a weight grid).
    s_w: float (B, 1, N) per-column scales (or one value).
    amax_history: float (2, steps): absmax of the activations (row 0) and of the output
      gradient (row 1) at the last steps, newest first.
    amax_x: float scalar, this step's absmax of the activations.
    g_bits: None for float backward dots (the gradient row is then left as it is), else the
      bits of the quantized output gradient.
    backend: where the int8 products run (`kernel_backend`).
    calibrating: the gradient scale from this step's absmax instead of the history.

  Returns:
    float32 (B, M, N).

  Example:
    >>> u = jnp.ones((1, 4, 8)); v = jnp.ones((1, 8, 2)); h = jnp.ones((2, 3))
    >>> delayed_int_dot(u, jnp.full((1, 4, 1), 0.5), v, jnp.ones((1, 1, 2)), h,
    ...                 jnp.float32(0.5), 8)[0, 0]
    Array([4., 4.], dtype=float32)
  """
  return _delayed_dot(u_x, s_x, u_w, s_w, amax_history, amax_x, g_bits,
                      kernel_backend(backend), calibrating)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _delayed_dot(u_x, s_x, u_w, s_w, hist, amax_x, g_bits, backend, calibrating):
  return _int_dot_fwd(u_x, s_x, u_w, s_w, g_bits, backend)[0]


def _delayed_dot_fwd(u_x, s_x, u_w, s_w, hist, amax_x, g_bits, backend, calibrating):
  y, res = _int_dot_fwd(u_x, s_x, u_w, s_w, g_bits, backend)
  return y, res + (hist, amax_x)


def _delayed_dot_bwd(g_bits, backend, calibrating, res, g):
  qx, s_x, qw, s_w, hist, amax_x = res
  if g_bits is None:
    dux = jnp.einsum("bmn,bkn->bmk", g * s_w, qw.astype(jnp.float32))
    duw = jnp.einsum("bmk,bmn->bkn", qx.astype(jnp.float32), g * s_x)
    amax_g = None  # float backward dots: the gradient row is left as it is
  else:
    g = g.astype(jnp.float32)
    amax_g = _absmax_or_inf(g)
    s_g = amax_g / core.qrange(g_bits)[1] if calibrating else amax_scale(hist[1], g_bits)
    qg = core.quantize(g, s_g, bits=g_bits)  # once, for both dots
    # A non-finite gradient poisons the products (int8 codes cannot carry it). Applied to the
    # dots' outputs, not to the rounding, so nothing waits for the absmax before rounding.
    s_g = jnp.where(jnp.isinf(amax_g), jnp.nan, s_g)
    # The weight re-quantized per input feature (its row): the output-channel scales lie
    # on the axis d lhs contracts.
    w_hat = qw.astype(jnp.float32) * s_w
    s_k, _ = core.compute_scale(w_hat, 8, axes=2)  # (B, K, 1)
    q_k = core.quantize(w_hat, s_k, bits=8)
    if backend == "xla" and pallas_kernels.target_platform() != "cpu":
      # XLA:TPU / GPU pick the operand layouts themselves (explicit transposes only add
      # copies here: every operand is produced by a fusion that can write either layout).
      idot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((0,), (0,))),
                                                    preferred_element_type=jnp.int32)
      dux_i, duw_i = idot(qg, q_k, ((2,), (2,))), idot(qx, qg, ((1,), (1,)))
    else:
      dux_i = _idot(qg, q_k, backend, b_transposed=True)
      duw_i = _idot_tn(qx, qg, backend)
    dux = dux_i.astype(jnp.float32) * (s_g * jnp.swapaxes(s_k, 1, 2))
    duw = duw_i.astype(jnp.float32) * (s_g * s_x[:, :1])
  ds_w = jnp.sum(qw.astype(jnp.float32) * duw, axis=1, keepdims=True)
  push = lambda row, amax: jnp.concatenate([amax.astype(hist.dtype)[None], row[:-1]])
  new_hist = jnp.stack([push(hist[0], amax_x),
                        hist[1] if g_bits is None else push(hist[1], amax_g)])
  return (dux * s_x, jnp.zeros_like(s_x), duw * s_w, _unbroadcast(ds_w, s_w.shape), new_hist,
          jnp.zeros_like(amax_x))


_delayed_dot.defvjp(_delayed_dot_fwd, _delayed_dot_bwd)


def fp8_dot(u_x: Array, s_x: Array, u_w: Array, s_w: Array, fmt: str) -> Array:
  """``(u_x s_x) @ (u_w s_w)`` batched, the product ``u_x @ u_w`` run on fp8 operands
  (``fmt`` "e4m3" or "e5m2", the grids' own values) with float32 accumulation.

  Products of two fp8 values are exact in float32, so the result is the float32 dot of the
  fake-quantized operands up to the order of the sums. Backward: the STE of the float product,
  as `int_dot`'s float backward (the fp8 operands saved from the forward pass, 1 byte each).
  What the compilers make of the fp8 dot (XLA:CPU converts to float32; TPU / GPU):
  docs/quantization.md.

  Args:
    u_x: float (B, M, K), values of ``fmt`` (an activation grid).
    s_x: float (B, M, 1) per-row scales.
    u_w: float (B, K, N), values of ``fmt`` (a weight grid).
    s_w: float (B, 1, N) per-column scales.

  Returns:
    float32 (B, M, N).

  Example:
    >>> u = jnp.full((1, 4, 8), 1.5); v = jnp.ones((1, 8, 2))
    >>> fp8_dot(u, jnp.full((1, 4, 1), 0.5), v, jnp.ones((1, 1, 2)), "e4m3")[0, 0]
    Array([6., 6.], dtype=float32)
  """
  return _fp8_dot(u_x, s_x, u_w, s_w, fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fp8_dot(u_x, s_x, u_w, s_w, fmt):
  return _fp8_dot_fwd(u_x, s_x, u_w, s_w, fmt)[0]


def _fp8_dot_fwd(u_x, s_x, u_w, s_w, fmt):
  dtype = formats.float_format(fmt).dtype
  qx, qw = u_x.astype(dtype), u_w.astype(dtype)  # exact: the grids hold fp8 values
  y = jnp.einsum("bmk,bkn->bmn", qx, qw, preferred_element_type=jnp.float32) * s_x * s_w
  return y, (qx, s_x, qw, s_w)


def _fp8_dot_bwd(fmt, res, g):
  del fmt
  qx, s_x, qw, s_w = res
  fx, fw = qx.astype(jnp.float32), qw.astype(jnp.float32)
  dux = jnp.einsum("bmn,bkn->bmk", g * s_w, fw)
  duw = jnp.einsum("bmk,bmn->bkn", fx, g * s_x)
  ds_x = jnp.sum(fx * dux, axis=2, keepdims=True)
  ds_w = jnp.sum(fw * duw, axis=1, keepdims=True)
  return (dux * s_x, _unbroadcast(ds_x, s_x.shape), duw * s_w, _unbroadcast(ds_w, s_w.shape))


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_float_dot(x: Array, w: Array, precision: Any) -> Array:
  """(M, K) @ (K, N) in float whose weight gradient transposes the smaller operand.

  For ``dW = X^T G`` XLA's CPU backend transposes ``X`` with its producer fused in, reading
  floats in strided order; when ``N < K`` (e.g. an MLP down-projection) transposing ``G``
  instead and computing ``(G^T X)^T`` moves a quarter of the data.
  """
  return jnp.dot(x, w, precision=precision)


def _cpu_float_dot_fwd(x, w, precision):
  return jnp.dot(x, w, precision=precision), (x, w)


def _cpu_float_dot_bwd(precision, res, g):
  x, w = res
  dx = jnp.dot(g, w.T, precision=precision)
  if w.shape[1] < w.shape[0]:
    dw = jnp.dot(_swap_materialized(g[None])[0], x, precision=precision).T
  else:
    dw = jnp.dot(x.T, g, precision=precision)
  return dx, dw


_cpu_float_dot.defvjp(_cpu_float_dot_fwd, _cpu_float_dot_bwd)


# --------------------------------------------------------------------------- public dot


def quant_dot_general(
    lhs: Array,
    rhs: Array | QArray,
    dimension_numbers: DimensionNumbers,
    spec: Quant,
    *,
    w_step: Array | None = None,
    w_zero: Array | None = None,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    backend: str | None = None,
    amax_history: Array | None = None,
    calibrating: bool = False,
) -> Array:
  """``lax.dot_general(lhs, rhs)`` with ``rhs`` (the weight) and optionally ``lhs`` quantized.

  .. math::  y = \\hat x \\cdot \\hat w, \\quad \\hat w = Q_{w}(rhs), \\; \\hat x = Q_{a}(lhs)

  Weights get ``spec.w_bits`` with per-tensor / per-channel / per-group scales (calibrated each
  call, or LSQ-learned when ``w_step`` is given); activations, when ``spec.a_bits`` is set, get
  dynamic per-token or per-tensor scales. With both on symmetric grids the product is a real
  ``int8 x int8 -> int32`` dot (per group: one per group, rescaled and summed), else a float dot
  of the fake-quantized operands. Gradients are the STE (and LSQ for ``w_step``).

  Args:
    lhs: activations, any shape, e.g. (batch, seq, K).
    rhs: weight, e.g. (K, N), or a packed `QArray` (the serving form `jaxcomp.convert`
      makes): then the stored integers are used as they are, with the same result.
    dimension_numbers: as for `jax.lax.dot_general`.
    spec: a `jaxcomp.Quant`.
    w_step: LSQ weight step in the kernel layout given by `weight_scale_shape`.
    w_zero: zero points of a solved asymmetric grid, shaped like ``w_step``.
    precision, preferred_element_type, out_sharding: passed to the float dot.
    backend: where integer / packed products run: "xla", or "tpu" / "gpu" for the Pallas
      kernels; None resolves `kernel_backend` now (quantized layers pass the backend they
      resolved when built).
    amax_history: with ``spec.scaling="delayed"``: the layer's (2, steps) absmax history
      (`delayed_int_dot`), which then receives the new history as its cotangent.
    calibrating: delayed scaling only: scales from this call's own absmax
      (`jaxcomp.calibrate_amax`).

  Returns:
    The dot_general output, in ``preferred_element_type`` or the promoted input dtype.

  Example:
    >>> x = jnp.ones((2, 8, 64)); w = jnp.ones((64, 32)) / 64
    >>> y = quant_dot_general(x, w, (((2,), (0,)), ((), ())), jc.Quant(w_bits=8, a_bits=8))
    >>> y.shape
    (2, 8, 32)
  """
  backend = kernel_backend(backend)
  if isinstance(rhs, QArray):
    return _packed_dot_general(lhs, rhs, dimension_numbers, spec, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding, backend=backend,
                               amax_history=amax_history)
  frame = _Frame(lhs.shape, rhs.shape, dimension_numbers)
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  if w_step is not None and w_step.ndim != rhs.ndim:
    raise ValueError(f"w_step must have the kernel's rank {rhs.ndim}, got shape {w_step.shape}")

  if spec.a_bits is None:  # Weight-only: a float dot on the fake-quantized kernel.
    w_hat = fake_quant_weight(rhs, frame.rc, spec, w_step, w_zero)
    return _float_dot(lhs, w_hat, frame, dimension_numbers, precision, preferred_element_type,
                      out_sharding, out_dtype)

  x3, w3 = frame.lhs(lhs), frame.rhs(rhs)
  step3 = None if w_step is None else frame.rhs(w_step)
  zero3 = None if w_zero is None else frame.rhs(w_zero)
  u_w, s_w = _weight_grid(w3, spec, step3, zero3)
  if spec.scaling == "delayed":
    return _delayed_act_dot(lhs, u_w, s_w, frame, spec, out_dtype, backend,
                            _history(amax_history), calibrating)
  return _quantized_act_dot(lhs, u_w, s_w, frame, spec, precision, preferred_element_type,
                            out_dtype, rhs.dtype, backend)


def _absmax_or_inf(x: Array) -> Array:
  """``max |x|`` in one reduction, +inf when ``x`` holds a NaN or inf (XLA's max need not
  propagate NaN)."""
  return jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), jnp.inf))


def _delayed_act_dot(lhs, u_w, s_w, frame, spec, out_dtype, backend, hist, calibrating):
  """The activations on the delayed per-tensor scale, times the weight grid (`delayed_int_dot`).

  The rounding and the clipping pass the gradient straight through (as casts do in fp8
  training; a clipped STE would read the tensor again for its mask). A NaN or inf in the
  activations makes their absmax infinite, which turns this call's output (and, through the
  history, the next steps') into NaN: int8 codes cannot carry it.
  """
  x3 = frame.lhs(lhs).astype(jnp.float32)
  # One reduction beside the rounding, in float32 as the grid divides (XLA fuses both into
  # the op producing x); a non-finite element gives an infinite absmax.
  amax_x = jax.lax.stop_gradient(_absmax_or_inf(x3))
  qmax = core.qrange(spec.a_bits)[1]
  if calibrating:
    s_x = amax_x / qmax
  else:
    s_x = jax.lax.stop_gradient(amax_scale(hist[0], spec.a_bits))
  v = x3 / s_x
  u_x = v + jax.lax.stop_gradient(jnp.clip(jnp.round(v), -qmax, qmax) - v)
  s_x = jnp.where(jnp.isinf(amax_x), jnp.nan, s_x)
  y = delayed_int_dot(u_x, jnp.broadcast_to(s_x, (frame.B, frame.M, 1)), u_w,
                      jnp.broadcast_to(s_w, (frame.B, 1, frame.N)), hist, amax_x, spec.g_bits,
                      backend, calibrating)
  return frame.out(y).astype(out_dtype)


def _float_dot(lhs, w_hat, frame, dimension_numbers, precision, preferred_element_type,
               out_sharding, out_dtype):
  """The float dot of a weight-only layer (on a fake-quantized or dequantized kernel)."""
  if pallas_kernels.target_platform() == "cpu" and frame.B == 1 and preferred_element_type is None:
    y = _cpu_float_dot(frame.lhs(lhs)[0], frame.rhs(w_hat)[0], precision)
    return frame.out(y).astype(out_dtype)
  kw = {} if out_sharding is None else {"out_sharding": out_sharding}
  return jax.lax.dot_general(lhs, w_hat, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kw)


def _quantized_act_dot(lhs, u_w, s_w, frame, spec, precision, preferred_element_type,
                       out_dtype, w_dtype, backend):
  """Quantizes the activations and multiplies with a weight grid ``u_w`` of scale ``s_w``.

  ``u_w``/``s_w`` come from `_weight_grid`: (B, K, N)/(B, 1, N), or per group
  (B, G, g, N)/(B, G, 1, N).
  """
  u_x, s_x = _act_grid(frame.lhs(lhs), spec)
  if spec.int_dot:
    if spec.granularity == "group":
      b, g, gs, n = u_w.shape
      ux = core.pad_to_groups(u_x, 2, gs).reshape(b, frame.M, g, gs).transpose(0, 2, 1, 3).reshape(b * g, frame.M, gs)
      sx = jnp.broadcast_to(s_x[:, None], (b, g) + s_x.shape[1:]).reshape(b * g, -1, 1)
      y = int_dot(ux, sx, u_w.reshape(b * g, gs, n), s_w.reshape(b * g, 1, n), spec.g_bits,
                  backend)
      y = y.reshape(b, g, frame.M, n).sum(axis=1)
    else:
      y = int_dot(u_x, jnp.broadcast_to(s_x, (frame.B, frame.M, 1)), u_w,
                  jnp.broadcast_to(s_w, (frame.B, 1, frame.N)), spec.g_bits, backend)
    return frame.out(y).astype(out_dtype)

  if spec.fp8_dot and spec.granularity != "group":
    y = fp8_dot(u_x, jnp.broadcast_to(s_x, (frame.B, frame.M, 1)), u_w,
                jnp.broadcast_to(s_w, (frame.B, 1, frame.N)), spec.w_format)
    return frame.out(y).astype(out_dtype)
  # Asymmetric grids, mixed or grouped float formats: a float dot of the fake-quantized
  # operands.
  x_hat = (u_x * s_x).astype(lhs.dtype)
  w_hat = (u_w * s_w).reshape(frame.B, -1, frame.N)[:, :frame.K].astype(w_dtype)
  y = jnp.einsum("bmk,bkn->bmn", x_hat, w_hat, precision=precision,
                 preferred_element_type=preferred_element_type)
  return frame.out(y).astype(out_dtype)


# --------------------------------------------------------------------------- packed weights

# Below this many rows, XLA's CPU int8 GEMM is fed the weight as its left operand and the rows
# padded to this count: a plain int8 matrix-vector product is ~5-10x slower than float32 there,
# while ``W (N, K) @ X^T (K, 8)`` hits the fast int8 GEMM (AMX / VNNI).
_CPU_SKINNY_ROWS = 8


def _packed_dot_general(lhs: Array, qa: QArray, dimension_numbers: DimensionNumbers,
                        spec: Quant, *, precision: Any, preferred_element_type: Any,
                        out_sharding: Any, backend: str, amax_history: Array | None = None
                        ) -> Array:
  """`quant_dot_general` with a packed `QArray` weight: the serving path.

  Its result equals the fake-quant layer's (the same integers and scales, the same int32 or
  float dot): weight-only layers dequantize and run the float dot; W8A8 layers quantize the
  activations per token and multiply int8 x int8 -> int32 against the stored values.
  """
  frame = _Frame(lhs.shape, qa.shape, dimension_numbers)
  if frame.B != 1 or frame.rc != qa.contracting:
    raise ValueError(
        f"packed kernel {qa.shape} was packed for contracting axes {qa.contracting}, but the "
        f"dot contracts {frame.rc} with batch axes {frame.rb}")
  out_dtype = preferred_element_type or lhs.dtype
  if spec.a_bits is None:
    if backend != "xla" and qa.packed and qa.fmt == "int":
      return frame.out(_int4_kernel_dot(frame.lhs(lhs)[0], qa, backend, out_dtype)[None])
    return _float_dot(lhs, qa.dequantize(lhs.dtype), frame, dimension_numbers, precision,
                      preferred_element_type, out_sharding, out_dtype)
  x2 = frame.lhs(lhs)
  if (spec.int_dot and qa.packed and qa.bits == 4 and qa.zero_point is None
      and backend == "xla" and pallas_kernels.target_platform() == "cpu"
      and x2.shape[1] < _CPU_SKINNY_ROWS and (qa.group or 2) % 2 == 0):
    # Packed int4 x int8 at decode (per channel, or G groups): GEMMs on the packed bytes, each
    # group's int32 sums scaled as the other paths scale them, then summed (exact for G = 1).
    u_x, s_x = _act_grid(x2, spec, amax_history)
    acc = _int4_skinny_dot(_int8(u_x[0]), qa.values, qa.group, s_x).transpose(0, 2, 1)  # G, M, N
    y = acc.astype(jnp.float32) * s_x * qa.scales().T[:, None, :]
    return frame.out(y.sum(axis=0)[None]).astype(out_dtype)
  if spec.int_dot and spec.granularity != "group":
    if backend != "xla":
      # The Pallas W8A8 kernel: the activations quantized per token inside it, as each tile
      # is loaded (the int8 activations never reach HBM); int32 accumulator, scales fused.
      s_x = jnp.broadcast_to(_act_scale(x2, spec, amax_history), x2.shape[:2] + (1,))[0, :, 0]
      y = pallas_kernels.int8_matmul(x2[0], qa.ints(), s_x, qa.scales()[:, 0], w_layout="nk",
                                     x_bits=spec.a_bits, out_dtype=jnp.float32,
                                     backend=backend)
      return frame.out(y[None]).astype(out_dtype)
    u_x, s_x = _act_grid(x2, spec, amax_history)
    qx, qw = _int8(u_x[0]), qa.ints()  # (M, K), (N, K)
    m = qx.shape[0]
    if pallas_kernels.target_platform() == "cpu" and m < _CPU_SKINNY_ROWS:
      qx = jnp.pad(qx, ((0, _CPU_SKINNY_ROWS - m), (0, 0)))
      acc = jax.lax.dot_general(qw, qx, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32).T[:m]
    else:
      acc = jax.lax.dot_general(qx, qw, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32)
    y = acc[None].astype(jnp.float32) * s_x * qa.scales().T[None]
    return frame.out(y).astype(out_dtype)
  # Groups with int8 activations, asymmetric grids or float formats: the shared path on the
  # stored grid.
  n, k = qa.values.shape[0], frame.K
  u_w = qa.grid().T[None]  # (1, K, N)
  s_w = qa.scales().T[None]  # (1, G, N)
  if qa.zero_point is not None:
    u_w = u_w - core.expand_groups(qa.zero_point.T[None].astype(jnp.float32), 1, qa.group or k, k)
  if spec.granularity == "group":
    g = s_w.shape[1]
    u_w = core.pad_to_groups(u_w, 1, spec.group).reshape(1, g, spec.group, n)
    s_w = s_w.reshape(1, g, 1, n)
  return _quantized_act_dot(lhs, u_w, s_w, frame, spec, precision, preferred_element_type,
                            out_dtype, lhs.dtype, backend)


def _int4_skinny_dot(qx: Array, nibbles: Array, group: int | None, s_x: Array) -> Array:
  """``W (N, K) @ qx^T`` per group, exact in int32, for int4 ``W`` packed two per byte
  (`pack_int4` along K: the ``N x K/2`` int8 bytes as stored) and a few int8 rows ``qx (R, K)``.

  The decode-time path on CPU. A stored byte is ``b = 16 hi + lo + 8`` (``hi``: the odd k,
  ``lo``: the even k), so with ``d = b & 15 = lo + 8`` and the activations' even / odd columns
  ``x_e``, ``x_o``:

      W @ qx^T = d @ x_e - 8 sum(x_e) + (b @ x_o - d @ x_o) / 16     (exact: b - d = 16 hi)

  One elementwise op (``d``: half the bytes of an int8 copy) and two int8 GEMMs, one of them
  on the stored bytes themselves; nothing is interleaved back into K order (which costs more
  than the product at a few rows). The GEMMs are fed at least 8 rows (XLA:CPU's int8 GEMM is
  far slower below that), so ``x_e`` and ``x_o`` share one GEMM's rows. With G groups each
  row is repeated G times, zero outside its group (a block-diagonal operand of G R rows), so
  the same two GEMMs give every group's partial sums without moving a weight byte.

  ``s_x`` (the activations' scales, any shape) orders ``d`` after the activations: it reads
  only parameters, so XLA would otherwise compute every layer's ``d`` first, all live at once
  (faulted in afresh every step; an ``optimization_barrier`` does not survive to XLA:CPU's
  scheduler). Where ``s_x`` holds a NaN, ``d`` is zeroed, which changes nothing: the result is
  scaled by ``s_x``.

  Args:
    qx: int8 (R, K) activations.
    nibbles: int8 (N, K / 2), `pack_int4` along K.
    group: elements of K per group (even; the last group may be shorter), or None.
    s_x: the activations' scales (only their NaN-ness is read).

  Returns:
    int32 (G, N, R): group g's partial sums (G = 1 per channel).

  Example:
    >>> from jaxcomp.quant.qarray import pack_int4
    >>> q = jnp.array([[1, -2, 7, -8]], jnp.int8)
    >>> _int4_skinny_dot(jnp.ones((1, 4), jnp.int8), pack_int4(q, 1), None, jnp.ones(()))[0, 0, 0]
    Array(-2, dtype=int32)
  """
  n, r, k = nibbles.shape[0], qx.shape[0], qx.shape[1]
  kh, gs = k // 2, group or k
  g = -(-k // gs)
  d = jnp.where(jnp.isnan(jnp.sum(s_x)), jnp.int8(0), nibbles & jnp.int8(15))  # lo + 8
  x_e, x_o = qx[:, 0::2], qx[:, 1::2]  # (R, K / 2)
  if g > 1:  # (G R, K / 2): row (g, r) is x's row r inside group g, zero elsewhere
    block = (jnp.arange(kh) // (gs // 2))[None, None, :] == jnp.arange(g)[:, None, None]
    x_e, x_o = (jnp.where(block, v[None], jnp.int8(0)).reshape(g * r, kh) for v in (x_e, x_o))
  int_dot = lambda a, b: jax.lax.dot_general(a, _pad_rows(b), (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.int32)
  gr = g * r
  d_x = int_dot(d, jnp.concatenate([x_e, x_o]))
  even, odd = d_x[:, :gr], d_x[:, gr:2 * gr]
  b_o = int_dot(nibbles, x_o)[:, :gr]
  acc = even - 8 * jnp.sum(x_e, axis=1, dtype=jnp.int32) + ((b_o - odd) >> 4)  # (N, G R)
  return acc.reshape(n, g, r).transpose(1, 0, 2)


def _pad_rows(x: Array) -> Array:
  """``x (R, K)`` padded with zero rows to a multiple of `_CPU_SKINNY_ROWS`."""
  return jnp.pad(x, ((0, -x.shape[0] % _CPU_SKINNY_ROWS), (0, 0)))


def _int4_kernel_dot(x: Array, qa: QArray, backend: str, out_dtype: Any) -> Array:
  """``x (M, K) @ W`` for a packed int4 `QArray` through `pallas_kernels.int4_matmul`.

  The kernel reads the QArray's bytes transposed to ``(K // 2, N)`` (and its scales and, for
  an asymmetric grid, zero points to ``(G, N)``): for 4 bits the stored bytes, so nothing is
  unpacked outside the kernel; 2- and 3-bit values (packed densely) are repacked as nibbles
  first (`QArray.nibbles`).
  """
  k = x.shape[1]
  if qa.group is not None and (qa.group not in pallas_kernels.int4_matmul_groups
                               or k % qa.group):
    raise ValueError(
        f"int4 kernel ({backend}): the packed kernel {qa.shape} has groups of {qa.group} over "
        f"K={k}; the kernel takes groups of {pallas_kernels.int4_matmul_groups} that divide K "
        f"(convert with backend='xla' for this model, or quantize with such a group)")
  act = x if x.dtype in (jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)
  zeros = None if qa.zero_point is None else qa.zero_point.T.astype(jnp.float32)
  return pallas_kernels.int4_matmul(act, qa.nibbles().T, qa.scales().T, group=qa.group, zeros=zeros,
                                    out_dtype=out_dtype, backend=backend)


def quant_conv_general_dilated(
    lhs: Array, rhs: Array, *args: Any, spec: Quant, w_step: Array | None = None,
    w_zero: Array | None = None, dimension_numbers: Any = None, **kwargs: Any
) -> Array:
  """``lax.conv_general_dilated`` with the kernel (and optionally the input) fake-quantized.

  The kernel shares one scale per output feature (or per group of input features, or per
  tensor); the input, when ``spec.a_bits`` is set, is quantized dynamically per example
  ("token") or per tensor. The convolution itself runs in float on the quantized values.

  Args:
    lhs: input, e.g. (N, H, W, C).
    rhs: kernel, e.g. (kh, kw, C, O).
    *args, dimension_numbers, **kwargs: as for `jax.lax.conv_general_dilated`.
    spec: a `jaxcomp.Quant`.
    w_step: LSQ weight step (kernel layout, `weight_scale_shape` with every axis but the output
      feature axis contracting), or a step solved by PTQ.
    w_zero: with ``w_step``, the integer-valued zero points of a solved asymmetric grid.

  Example:
    >>> x = jnp.ones((1, 8, 8, 3)); k = jnp.ones((3, 3, 3, 4))
    >>> dn = ("NHWC", "HWIO", "NHWC")
    >>> quant_conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn,
    ...                            spec=jc.Quant(w_bits=4)).shape
    (1, 8, 8, 4)
  """
  if isinstance(rhs, QArray):
    w_hat = rhs.dequantize(lhs.dtype)
  else:
    w_hat = fake_quant_weight(
        rhs, conv_contracting_axes(rhs.ndim, lhs.shape, dimension_numbers), spec, w_step,
        w_zero)
  if spec.a_bits is not None:
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    batch_axis = dn.lhs_spec[0]
    axes = tuple(a for a in range(lhs.ndim) if a != batch_axis) if (
        spec.a_granularity == "token") else None
    lhs = core.fake_quant(lhs, spec.a_bits, axes=axes, symmetric=spec.a_symmetric)
  return jax.lax.conv_general_dilated(lhs, w_hat, *args, dimension_numbers=dimension_numbers,
                                      **kwargs)


def conv_contracting_axes(
    kernel_ndim: int, lhs_shape: Sequence[int] | None = None, dimension_numbers: Any = None
) -> tuple[int, ...]:
  """Every kernel axis but the output-feature axis (HWIO's last axis unless told otherwise).

  Example:
    >>> conv_contracting_axes(4)
    (0, 1, 2)
  """
  if dimension_numbers is None or lhs_shape is None:
    out_axis = kernel_ndim - 1
  else:
    dn = jax.lax.conv_dimension_numbers(tuple(lhs_shape), (1,) * kernel_ndim, dimension_numbers)
    out_axis = dn.rhs_spec[0]
  return tuple(a for a in range(kernel_ndim) if a != out_axis)
