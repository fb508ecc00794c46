"""Block-sparse matmul: TPU (scalar prefetch) and GPU kernels (interpreted) against the dense
product of the masked weights, over ragged shapes, empty block columns and densities; bad
input."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxcomp.sparse.block_sparse import BlockSparse
from jaxcomp.sparse.masks import block_mask
from pallas_kernels import block_sparse_matmul, block_sparse_matmul_reference


def _problem(rng, m, k, n, block, sparsity):
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  keep = block_mask(jnp.abs(w), sparsity, block)
  bs = BlockSparse.from_dense(w, keep, block)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  return x, bs, np.asarray(x) @ np.asarray(w * keep)


CASES = [  # (m, k, n, block, sparsity, backends)
    (5, 300, 260, (128, 128), 0.6, ("tpu", "gpu")),  # ragged K and N, an empty column
    (20, 512, 384, (128, 128), 0.75, ("tpu", "gpu")),
    (1, 256, 256, (128, 256), 0.0, ("tpu", "gpu")),  # dense: every tile stored
    (3, 64, 48, (16, 16), 0.5, ("gpu",)),  # small tiles: GPU only
    (40, 96, 64, (32, 16), 0.9, ("gpu",)),
]


@pytest.mark.parametrize("m,k,n,block,sparsity,backends", CASES)
def test_matches_the_masked_dense_product(m, k, n, block, sparsity, backends):
  rng = np.random.default_rng(m * n)
  x, bs, dense = _problem(rng, m, k, n, block, sparsity)
  args = (x, bs.values, bs.indices, bs.counts)
  ref = block_sparse_matmul_reference(*args, n=n)
  np.testing.assert_allclose(np.asarray(ref), dense, rtol=1e-5, atol=1e-4)
  for backend in backends:
    y = block_sparse_matmul(*args, n=n, backend=backend, interpret=True)
    np.testing.assert_allclose(np.asarray(y), dense, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_epilogue_and_empty_columns(backend):
  rng = np.random.default_rng(7)
  x, bs, dense = _problem(rng, 4, 256, 256, (128, 128), 0.5)
  counts = bs.counts.at[0].set(0)  # drop block column 0 entirely: bias only there
  bias = jnp.asarray(rng.standard_normal(256), jnp.float32)
  y = block_sparse_matmul(x, bs.values, bs.indices, counts, n=256, bias=bias,
                          activation="relu", backend=backend, interpret=True)
  ref = block_sparse_matmul_reference(x, bs.values, bs.indices, counts, n=256, bias=bias,
                                      activation="relu")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(y[:, :128]), np.maximum(np.asarray(bias[:128]), 0)[None]
                             .repeat(4, 0), rtol=1e-6)


def test_bad_input():
  vals = jnp.zeros((2, 3, 128, 128))
  idx, cnt = jnp.zeros((2, 3), jnp.int32), jnp.full((2,), 3, jnp.int32)
  x = jnp.zeros((4, 256))
  with pytest.raises(ValueError, match=r"block indices must lie in \[0, 2\).*got \[0, 5\]"):
    block_sparse_matmul(x, vals, idx.at[1, 2].set(5), cnt, n=256, backend="tpu")
  with pytest.raises(ValueError, match=r"counts must lie in \[0, 3\]"):
    block_sparse_matmul(x, vals, idx, cnt.at[0].set(4), n=256, backend="tpu")
  with pytest.raises(ValueError, match=r"indices must be int32\[2, 3\]"):
    block_sparse_matmul(x, vals, idx.astype(jnp.int16), cnt, n=256, backend="tpu")
  with pytest.raises(ValueError, match=r"n=100 needs 1 block columns of 128, values has 2"):
    block_sparse_matmul(x, vals, idx, cnt, n=100, backend="tpu")
  with pytest.raises(ValueError, match=r"TPU kernel needs blocks whose sides are multiples "
                     r"of 128.*\(16, 16\)"):
    block_sparse_matmul(jnp.zeros((4, 32)), jnp.zeros((2, 1, 16, 16)),
                        jnp.zeros((2, 1), jnp.int32), jnp.ones((2,), jnp.int32), n=32,
                        backend="tpu")
