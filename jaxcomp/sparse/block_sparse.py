"""Block-sparse kernels: a pytree storing only the kept ``(bk, bn)`` tiles, and its XLA matmul.

Layout ("blocked ELL" by output block column, the order the block-sparse kernel walks): for each
of the ``gn = ceil(N / bn)`` output block columns ``j``, ``counts[j]`` kept tiles whose K-block
indices are ``indices[j, :counts[j]]`` (ascending) and whose values are ``values[j, :counts[j]]``.
Rows are padded to the largest count, ``nnz_max``: padding repeats the column's last index
(so a kernel prefetching it stays in range) with zero values, and ``counts`` says where real
tiles stop. A shape that the block does not divide is zero-padded up to whole tiles.

Example::

  w = jax.random.normal(key, (256, 512))
  keep = block_mask(jnp.abs(w), 0.75, (32, 128))
  bs = BlockSparse.from_dense(w, keep, (32, 128))
  y = block_sparse_matmul(x, bs)             # == x @ (w * keep)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

Array = jax.Array

__all__ = ["BlockSparse", "block_sparse_matmul"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """A ``(K, N)`` kernel of which only some ``(bk, bn)`` tiles are stored.

  Attributes:
    values: ``[gn, nnz_max, bk, bn]`` tile values, per output block column.
    indices: ``int32[gn, nnz_max]`` K-block index of each tile (padding repeats the last one).
    counts: ``int32[gn]`` real tiles per output block column.
    shape: logical ``(K, N)`` (static).
    block: ``(bk, bn)`` (static).
  """

  values: Array
  indices: Array
  counts: Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  block: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def grid(self) -> tuple[int, int]:
    """``(gk, gn)``: tiles along K and N (after padding)."""
    (k, n), (bk, bn) = self.shape, self.block
    return -(-k // bk), -(-n // bn)

  @property
  def density(self) -> float:
    """Fraction of tiles stored."""
    gk, gn = self.grid
    return float(np.sum(np.asarray(self.counts))) / (gk * gn)

  @classmethod
  def from_dense(cls, w: Array, keep: Array, block: Sequence[int]) -> BlockSparse:
    """Stores the tiles of ``w`` that ``keep`` marks (a block mask, e.g. from `block_mask`).

    Args:
      w: ``(K, N)`` kernel.
      keep: ``bool[K, N]``, constant on every ``block`` tile (checked).
      block: ``(bk, bn)``.

    Example:
      >>> w = jnp.arange(16.).reshape(4, 4)
      >>> keep = jnp.array([[1, 1, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2, bool)
      >>> bs = BlockSparse.from_dense(w, keep, (2, 2))
      >>> bs.indices.tolist(), bs.counts.tolist()
      ([[0], [1]], [1, 1])
    """
    w, keep = np.asarray(w), np.asarray(keep, bool)
    if w.ndim != 2 or keep.shape != w.shape:
      raise ValueError(f"BlockSparse.from_dense: kernel {w.shape} and mask {keep.shape} must be "
                       "the same 2-D shape")
    if (len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, np.integer))
                               or b <= 0 for b in block)):
      raise ValueError(f"block must be two positive ints (bk, bn), got {block!r}")
    (k, n), (bk, bn) = w.shape, (int(block[0]), int(block[1]))
    gk, gn = -(-k // bk), -(-n // bn)
    pad = ((0, gk * bk - k), (0, gn * bn - n))
    tiles = np.pad(w, pad).reshape(gk, bk, gn, bn).transpose(2, 0, 1, 3)  # [gn, gk, bk, bn]
    tiled = lambda fill: np.pad(keep, pad, constant_values=fill).reshape(gk, bk, gn, bn)
    tile_keep = tiled(True).all(axis=(1, 3))  # over the real elements of ragged edge tiles
    if not np.array_equal(tile_keep, tiled(False).any(axis=(1, 3))):
      raise ValueError(f"BlockSparse.from_dense: the mask is not constant on {block} tiles")
    tile_keep = tile_keep.T  # [gn, gk]
    counts = tile_keep.sum(axis=1).astype(np.int32)
    nnz_max = max(int(counts.max()), 1)
    indices = np.zeros((gn, nnz_max), np.int32)
    values = np.zeros((gn, nnz_max, bk, bn), w.dtype)
    for j in range(gn):
      rows = np.flatnonzero(tile_keep[j])
      if rows.size:
        indices[j, :rows.size] = rows
        indices[j, rows.size:] = rows[-1]
        values[j, :rows.size] = tiles[j, rows]
    return cls(jnp.asarray(values), jnp.asarray(indices), jnp.asarray(counts), (k, n),
               (bk, bn))

  def to_dense(self) -> Array:
    """The ``(K, N)`` kernel, zeros in the tiles not stored.

    Example:
      >>> w = jnp.ones((4, 4))
      >>> BlockSparse.from_dense(w, w > 0, (2, 2)).to_dense().sum()
      Array(16., dtype=float32)
    """
    gk, gn = self.grid
    (bk, bn), nnz = self.block, self.values.shape[1]
    valid = jnp.arange(nnz)[None, :] < self.counts[:, None]  # [gn, nnz]
    onehot = jax.nn.one_hot(self.indices, gk, dtype=self.values.dtype) * valid[..., None]
    dense = jnp.einsum("jtg,jtkn->gkjn", onehot, self.values)  # [gk, bk, gn, bn]
    return dense.reshape(gk * bk, gn * bn)[:self.shape[0], :self.shape[1]]


def block_sparse_matmul(x: Array, w: BlockSparse, *, preferred_element_type=None,
                        backend: str | None = None) -> Array:
  """``x @ w`` for a `BlockSparse` kernel: the Pallas kernel on TPU / GPU, else XLA.

  Only stored tiles are multiplied. On TPU / GPU (or with ``$JAXCOMP_KERNEL_BACKEND`` set to
  ``tpu`` / ``gpu``) this is `pallas_kernels.block_sparse_matmul`; elsewhere (or with ``xla``)
  the XLA reference: for each output block column, the ``x`` slices of its K-blocks are
  gathered and contracted with its tiles (padding tiles are zero and masked).

  Args:
    x: ``[..., K]`` activations.
    w: ``BlockSparse`` of logical shape ``(K, N)``.
    preferred_element_type: accumulation / output dtype (default: ``x``'s result type).
    backend: "xla", "tpu", "gpu" or None (``$JAXCOMP_KERNEL_BACKEND``, else the device).

  Raises:
    ValueError: ``x``'s last axis is not ``K``; or a Pallas backend is selected and the
      block shape is not one its kernel takes (TPU: multiples of 128; GPU: powers of 2 >= 16).

  Returns:
    ``[..., N]``.

  Example:
    >>> w = jnp.eye(4)
    >>> bs = BlockSparse.from_dense(w, jnp.kron(jnp.eye(2), jnp.ones((2, 2))) > 0, (2, 2))
    >>> block_sparse_matmul(jnp.arange(4.)[None], bs)
    Array([[0., 1., 2., 3.]], dtype=float32)
  """
  (k, n), (bk, bn) = w.shape, w.block
  if x.shape[-1] != k:
    raise ValueError(f"block_sparse_matmul: x has {x.shape[-1]} features, the kernel {k} inputs")
  gk, gn = w.grid
  lead = x.shape[:-1]
  backend = pallas_kernels.resolve_backend(backend)
  if backend != "xla":
    fits = (bk % 128 == 0 and bn % 128 == 0 if backend == "tpu" else
            min(bk, bn) >= 16 and bk & (bk - 1) == 0 and bn & (bn - 1) == 0)
    if not fits:
      raise ValueError(
          f"block_sparse_matmul ({backend} kernel): blocks ({bk}, {bn}) are not supported "
          f"(TPU: sides multiples of 128; GPU: powers of two >= 16); pass backend='xla' (or "
          f"set JAXCOMP_KERNEL_BACKEND=xla) for this model, or prune with such blocks")
    y = pallas_kernels.block_sparse_matmul(
        x.reshape(-1, k), w.values.astype(x.dtype), w.indices, w.counts, n=n,
        out_dtype=preferred_element_type or x.dtype, backend=backend)
    return y.reshape(lead + (n,))
  xb = jnp.pad(x.reshape(-1, k), ((0, 0), (0, gk * bk - k))).reshape(-1, gk, bk)
  gathered = xb[:, w.indices]  # [M, gn, nnz, bk]
  valid = (jnp.arange(w.values.shape[1])[None, :] < w.counts[:, None]).astype(x.dtype)
  y = jnp.einsum("mjtk,jt,jtkn->mjn", gathered, valid, w.values.astype(x.dtype),
                 preferred_element_type=preferred_element_type)
  return y.reshape(lead + (gn * bn,))[..., :n]
