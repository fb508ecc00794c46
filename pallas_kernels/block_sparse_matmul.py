"""Dense activations x block-sparse weights, visiting only the stored tiles.

Weight format (blocked ELL by output block column, as `jaxcomp.sparse.BlockSparse` stores it,
passed here as plain arrays so this package needs only jax):

* ``values [gn, nnz_max, bk, bn]``: the stored tiles of output block column ``j``;
* ``indices int32[gn, nnz_max]``: their K-block indices (padding repeats the last one);
* ``counts int32[gn]``: how many of the ``nnz_max`` entries are real.

TPU (Mosaic): a grid ``(M / tm, gn, nnz_max)`` with ``indices`` and ``counts`` delivered by
scalar prefetch (`pltpu.PrefetchScalarGridSpec`): the activation tile's index map reads
``indices[j, t]``, so only stored tiles are DMA'd; padding entries repeat the previous index,
so the pipeline issues no new copy and the kernel body skips them (``t >= counts[j]``). The
``t`` axis is innermost: each output tile is finished before the next starts. GPU (Triton):
one program per output tile loops over its ``counts[j]`` stored tiles. XLA: gathers the
activations' K blocks per stored tile (`jaxcomp.sparse.block_sparse_matmul`'s method).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm

Array = jax.Array


def block_sparse_matmul_reference(x: Array, values: Array, indices: Array, counts: Array, *,
                                  n: int, bias: Array | None = None,
                                  activation: str | None = None, out_dtype=None) -> Array:
  """The XLA path of `block_sparse_matmul` (same arguments, same result)."""
  gn, nnz, bk, bn = values.shape
  m, k = x.shape
  gk = -(-k // bk)
  xb = cm.pad_to(x, (m, gk * bk)).reshape(m, gk, bk)[:, indices]  # [M, gn, nnz, bk]
  valid = (jnp.arange(nnz)[None, :] < counts[:, None]).astype(jnp.float32)
  y = jnp.einsum("mjtk,jt,jtkn->mjn", xb.astype(jnp.float32), valid,
                 values.astype(jnp.float32)).reshape(m, gn * bn)[:, :n]
  if bias is not None:
    y = y + bias.reshape(1, -1).astype(jnp.float32)
  return cm.apply_activation(y, activation).astype(out_dtype or x.dtype)


def _check(x, values, indices, counts, n, bias, activation, backend) -> None:
  cm.check(getattr(x, "ndim", 0) == 2, f"block_sparse_matmul: x must be 2-D, got "
           f"{jnp.shape(x)}")
  cm.check(getattr(values, "ndim", 0) == 4, f"block_sparse_matmul: values must be "
           f"[gn, nnz_max, bk, bn], got shape {jnp.shape(values)}")
  gn, nnz, bk, bn = values.shape
  cm.check(jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(values.dtype, jnp.floating),
           f"block_sparse_matmul: x and values must be float, got {x.dtype} and {values.dtype}")
  cm.check(getattr(indices, "shape", None) == (gn, nnz) and indices.dtype == jnp.int32,
           f"block_sparse_matmul: indices must be int32{[gn, nnz]}, got "
           f"{getattr(indices, 'dtype', '?')}{list(jnp.shape(indices))}")
  cm.check(getattr(counts, "shape", None) == (gn,) and counts.dtype == jnp.int32,
           f"block_sparse_matmul: counts must be int32[{gn}], got "
           f"{getattr(counts, 'dtype', '?')}{list(jnp.shape(counts))}")
  k = x.shape[1]
  gk = -(-k // bk)
  cm.check(-(-n // bn) == gn, f"block_sparse_matmul: n={n} needs {-(-n // bn)} block columns "
           f"of {bn}, values has {gn}")
  if not isinstance(indices, jax.core.Tracer) and not isinstance(counts, jax.core.Tracer):
    lo, hi = int(jnp.min(indices)), int(jnp.max(indices))
    cm.check(lo >= 0 and hi < gk, f"block_sparse_matmul: block indices must lie in [0, {gk}) "
             f"(K={k} in blocks of {bk}), got [{lo}, {hi}]")
    c_lo, c_hi = int(jnp.min(counts)), int(jnp.max(counts))
    cm.check(c_lo >= 0 and c_hi <= nnz, f"block_sparse_matmul: counts must lie in "
             f"[0, {nnz}], got [{c_lo}, {c_hi}]")
  if bias is not None:
    cm.check(bias.size == n, f"block_sparse_matmul: bias must hold {n} values, got {bias.shape}")
  cm.check(activation in cm.ACTIVATIONS, f"block_sparse_matmul: activation must be one of "
           f"{cm.ACTIVATIONS}, got {activation!r}")
  if backend == "tpu":
    cm.check(bk % 128 == 0 and bn % 128 == 0,
             f"block_sparse_matmul: the TPU kernel needs blocks whose sides are multiples of "
             f"128 (activation tiles are (tm, bk) lanes), got ({bk}, {bn})")
  if backend == "gpu":
    cm.check(bk >= 16 and bn >= 16 and bk & (bk - 1) == 0 and bn & (bn - 1) == 0,
             f"block_sparse_matmul: the GPU kernel needs power-of-two blocks >= 16, got "
             f"({bk}, {bn})")


def block_sparse_matmul(x: Array, values: Array, indices: Array, counts: Array, *, n: int,
                        bias: Array | None = None, activation: str | None = None,
                        out_dtype=None, backend: str | None = None,
                        interpret: bool | None = None, tm: int | None = None) -> Array:
  """``x @ W`` for a block-sparse ``W (K, N)`` stored as ``values / indices / counts``.

  Args:
    x: ``(M, K)`` float activations.
    values, indices, counts: the blocked-ELL tiles (module docstring).
    n: N, the logical output width (static).
    bias, activation, out_dtype: fused epilogue (f32 accumulator).
    backend, interpret: as for `pallas_kernels.int8_matmul`.
    tm: rows of x per tile (default: M rounded up to 16, at most 256).

  Returns:
    ``(M, N)``.

  Example:
    >>> vals = jnp.ones((1, 1, 128, 128)); idx = jnp.zeros((1, 1), jnp.int32)
    >>> block_sparse_matmul(jnp.ones((2, 256)), vals, idx, jnp.ones((1,), jnp.int32),
    ...                     n=128, backend="xla")[0, 0]
    Array(128., dtype=float32)
  """
  backend = cm.resolve_backend(backend)
  _check(x, values, indices, counts, n, bias, activation, backend)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if backend == "xla":
    return block_sparse_matmul_reference(x, values, indices, counts, n=n, bias=bias,
                                         activation=activation, out_dtype=out_dtype)
  interpret = cm.interpret_arg(backend, cm.resolve_interpret(interpret, backend))
  gn, nnz, bk, bn = values.shape
  m, k = x.shape
  tm = tm or min(cm.round_up(m, 16), 256)
  mp, kp = cm.round_up(m, tm), -(-k // bk) * bk
  xp = cm.pad_to(x, (mp, kp)).astype(values.dtype)
  b = None if bias is None else cm.pad_to(bias.reshape(1, -1).astype(jnp.float32),
                                          (1, gn * bn))
  cost = pl.CostEstimate(
      flops=2 * mp * nnz * gn * bk * bn, transcendentals=0,
      bytes_accessed=int(values.size * values.dtype.itemsize
                         + mp * bk * nnz * gn * xp.dtype.itemsize
                         + mp * gn * bn * out_dtype.itemsize))
  run = _tpu_call if backend == "tpu" else _gpu_call
  y = run(xp, values, indices, counts, b, tm=tm, activation=activation, out_dtype=out_dtype,
          interpret=interpret, cost=cost)
  return y[:m, :n]


def _epilogue(acc, b_ref, activation, out_dtype):
  if b_ref is not None:
    acc = acc + b_ref[...]
  return cm.apply_activation(acc, activation).astype(out_dtype)


def _tpu_call(xp, values, indices, counts, b, *, tm, activation, out_dtype, interpret, cost):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  gn, nnz, bk, bn = values.shape
  mp = xp.shape[0]

  def kernel(idx_ref, cnt_ref, x_ref, w_ref, *refs):
    b_ref = refs[0] if b is not None else None
    o_ref, acc_ref = refs[-2], refs[-1]
    j, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(t < cnt_ref[j])
    def _accumulate():
      acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(t == nnz - 1)
    def _store():
      o_ref[...] = _epilogue(acc_ref[...], b_ref, activation, out_dtype)

  b_specs = [pl.BlockSpec((1, bn), lambda i, j, t, idx, cnt: (0, j))] if b is not None else []
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(mp // tm, gn, nnz),
      in_specs=[
          pl.BlockSpec((tm, bk), lambda i, j, t, idx, cnt: (i, idx[j, t])),
          pl.BlockSpec((None, None, bk, bn), lambda i, j, t, idx, cnt: (j, t, 0, 0)),
          *b_specs,
      ],
      out_specs=pl.BlockSpec((tm, bn), lambda i, j, t, idx, cnt: (i, j)),
      scratch_shapes=[pltpu.VMEM((tm, bn), jnp.float32)],
  )
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, gn * bn), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="jaxcomp_block_sparse_matmul",
  )(indices, counts, xp, values, *([b] if b is not None else []))


def _gpu_call(xp, values, indices, counts, b, *, tm, activation, out_dtype, interpret, cost):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  gn, nnz, bk, bn = values.shape
  mp, kp = xp.shape

  def kernel(idx_ref, cnt_ref, x_ref, w_ref, *refs):
    b_ref = refs[0] if b is not None else None
    o_ref = refs[-1]
    j = pl.program_id(1)

    def body(t, acc):
      kb = idx_ref[0, t]
      x = x_ref[:, pl.ds(pl.multiple_of(kb * bk, bk), bk)]
      return acc + jnp.dot(x, w_ref[0, t], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, cnt_ref[0], body, jnp.zeros((tm, bn), jnp.float32))
    del j
    o_ref[...] = _epilogue(acc, b_ref, activation, out_dtype)

  b_specs = [pl.BlockSpec((1, bn), lambda i, j: (0, j))] if b is not None else []
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, gn * bn), out_dtype),
      grid=(mp // tm, gn),
      in_specs=[
          pl.BlockSpec((1, nnz), lambda i, j: (j, 0)),
          pl.BlockSpec((1,), lambda i, j: (j,)),
          pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((1, nnz, bk, bn), lambda i, j: (j, 0, 0, 0)),
          *b_specs,
      ],
      out_specs=pl.BlockSpec((tm, bn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
      cost_estimate=cost,
      interpret=interpret,
      name="jaxcomp_block_sparse_matmul",
  )(indices, counts, xp, values, *([b] if b is not None else []))
