"""Block-sparse storage: round trip, matmul equals the masked dense matmul, ragged shapes, errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import sparse
from jaxcomp.sparse.block_sparse import BlockSparse, block_sparse_matmul


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(k=st.integers(1, 48), n=st.integers(1, 48),
                  block=st.sampled_from([(1, 1), (4, 4), (8, 16), (16, 8)]),
                  p=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_roundtrip_and_matmul_equal_masked_dense(k, n, block, p, seed):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(k, n)).astype(np.float32)
  # jitted: one program per function and example (eagerly, every op compiles per shape)
  keep = np.asarray(jax.jit(lambda s: sparse.block_mask(s, p, block))(np.abs(w)))
  bs = BlockSparse.from_dense(w, keep, block)
  np.testing.assert_array_equal(np.asarray(jax.jit(BlockSparse.to_dense)(bs)), w * keep)
  x = rng.normal(size=(3, 5, k)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(block_sparse_matmul)(jnp.asarray(x), bs)),
                             x @ (w * keep), rtol=1e-5, atol=1e-5)
  gk, gn = -(-k // block[0]), -(-n // block[1])
  assert int(bs.counts.sum()) == gk * gn - round(p * (gk * gn))  # round(p * n) of n tiles


def test_layout_for_the_kernel():
  w = np.arange(64, dtype=np.float32).reshape(8, 8)
  keep = np.zeros((8, 8), bool)
  keep[0:2, 0:4] = keep[6:8, 0:4] = keep[4:6, 4:8] = True  # column 0: k-blocks 0, 3; column 1: 2
  bs = BlockSparse.from_dense(w, keep, (2, 4))
  assert bs.values.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(bs.indices, [[0, 3], [2, 2]])  # padding repeats the last index
  np.testing.assert_array_equal(bs.counts, [2, 1])
  np.testing.assert_array_equal(bs.values[1, 1], 0)
  assert bs.density == pytest.approx(3 / 8)
  leaves = jax.tree.leaves(bs)
  assert len(leaves) == 3  # shape and block are static
  y = jax.jit(block_sparse_matmul)(jnp.ones((1, 8)), bs)
  np.testing.assert_allclose(y, np.ones((1, 8)) @ (w * keep))


def test_errors():
  w = np.ones((8, 8), np.float32)
  with pytest.raises(ValueError, match=r"not constant on \(2, 2\) tiles"):
    BlockSparse.from_dense(w, np.eye(8, dtype=bool), (2, 2))
  with pytest.raises(ValueError, match="must be the same 2-D shape"):
    BlockSparse.from_dense(w, np.ones((8, 4), bool), (2, 2))
  with pytest.raises(ValueError, match="block must be two positive ints"):
    BlockSparse.from_dense(w, w > 0, (2, 0))
  bs = BlockSparse.from_dense(w, w > 0, (2, 2))
  with pytest.raises(ValueError, match="x has 4 features, the kernel 8 inputs"):
    block_sparse_matmul(jnp.ones((2, 4)), bs)
