"""Pruning masks: exact sparsity for every pattern (hypothesis over shapes), N:M in every
group, block tiles whole, structured channels whole, and one-line errors."""

import hypothesis
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import sparse

SETTINGS = hypothesis.settings(max_examples=25, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
FRACTIONS = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])


def _jit(mask_fn, *args, **kwargs):
  """``mask_fn(scores, *args, **kwargs)`` as one jitted program (hypothesis draws a new shape
  each example; eagerly, every op of the mask compiles per shape)."""
  return jax.jit(lambda s: mask_fn(s, *args, **kwargs))


def _scores(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@SETTINGS
@hypothesis.given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=24), p=FRACTIONS,
                  seed=st.integers(0, 2**16))
def test_unstructured_exact_count(shape, p, seed):
  s = _scores(shape, seed)
  mask = np.asarray(_jit(sparse.unstructured_mask, p)(s))
  assert mask.shape == s.shape and mask.dtype == bool
  assert (~mask).sum() == round(p * s.size)
  if mask.any() and (~mask).any():  # every kept score >= every pruned one
    assert s[mask].min() >= s[~mask].max()


@SETTINGS
@hypothesis.given(shape=hnp.array_shapes(min_dims=2, max_dims=2, max_side=24), p=FRACTIONS,
                  seed=st.integers(0, 2**16))
def test_unstructured_per_output_exact_in_every_column(shape, p, seed):
  s = _scores(shape, seed)
  mask = np.asarray(_jit(sparse.unstructured_mask, p, axis=0)(s))
  np.testing.assert_array_equal((~mask).sum(axis=0), round(p * shape[0]))


def test_ties_are_broken_by_position():
  mask = sparse.unstructured_mask(jnp.ones(6), 0.5)
  np.testing.assert_array_equal(mask, [False, False, False, True, True, True])


def test_global_masks_rank_across_layers():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(8, 4)) * 0.1, "b": rng.normal(size=(16,)), "c": []}
  tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items() if len(v)}
  masks = sparse.global_masks(jax.tree.map(jnp.abs, tree), 0.5)
  pruned = sum(int((~m).sum()) for m in jax.tree.leaves(masks))
  assert pruned == 24
  assert sparse.sparsity(masks["a"]) > sparse.sparsity(masks["b"])  # small weights go first


@SETTINGS
@hypothesis.given(nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
                  groups=st.integers(1, 6), cols=st.integers(1, 9), axis=st.sampled_from([0, 1]),
                  seed=st.integers(0, 2**16))
def test_nm_holds_in_every_group(nm, groups, cols, axis, seed):
  n, m = nm
  shape = (groups * m, cols) if axis == 0 else (cols, groups * m)
  s = _scores(shape, seed)
  mask = np.asarray(_jit(sparse.nm_mask, n, m, axis=axis)(s))
  grouped = np.moveaxis(mask, axis, -1).reshape(-1, m)
  np.testing.assert_array_equal(grouped.sum(axis=1), n)
  assert sparse.sparsity(mask) == pytest.approx(1 - n / m)
  s_groups = np.moveaxis(s, axis, -1).reshape(-1, m)
  for g, k in zip(s_groups, grouped):  # the kept ones are the group's n largest
    if n < m:
      assert g[k].min() >= g[~k].max()


@SETTINGS
@hypothesis.given(k=st.integers(1, 40), n=st.integers(1, 40),
                  block=st.sampled_from([(1, 1), (2, 2), (4, 8), (8, 4), (16, 16)]), p=FRACTIONS,
                  seed=st.integers(0, 2**16))
def test_block_exact_and_whole_tiles(k, n, block, p, seed):
  s = np.abs(_scores((k, n), seed))
  mask = np.asarray(_jit(sparse.block_mask, p, block)(s))
  bk, bn = block
  gk, gn = -(-k // bk), -(-n // bn)
  padded = np.zeros((gk * bk, gn * bn), bool)
  padded[:k, :n] = mask
  tiles = padded.reshape(gk, bk, gn, bn).transpose(0, 2, 1, 3).reshape(gk, gn, -1)
  valid = np.zeros_like(padded)
  valid[:k, :n] = True
  vtiles = valid.reshape(gk, bk, gn, bn).transpose(0, 2, 1, 3).reshape(gk, gn, -1)
  kept = np.array([[t[v].all() for t, v in zip(r, vr)] for r, vr in zip(tiles, vtiles)])
  pruned = np.array([[not t[v].any() for t, v in zip(r, vr)] for r, vr in zip(tiles, vtiles)])
  assert (kept | pruned).all()  # every tile all kept or all pruned
  assert pruned.sum() == round(p * gk * gn)
  if k % bk == 0 and n % bn == 0:
    assert (~mask).sum() == round(p * gk * gn) * bk * bn


def test_block_tpu_tile_on_a_ragged_kernel():
  s = np.abs(_scores((576, 192), 0))  # SmolLM2's k_proj: 192 is not a multiple of 128
  mask = np.asarray(sparse.block_mask(s, 0.5, (8, 128)))
  assert mask.shape == (576, 192)
  assert np.unique(mask[:8, :128]).size == 1 and np.unique(mask[:8, 128:]).size == 1


@SETTINGS
@hypothesis.given(shape=hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=12),
                  p=FRACTIONS, seed=st.integers(0, 2**16))
def test_structured_channels_exact(shape, p, seed):
  s = np.abs(_scores(shape, seed))
  keep = np.asarray(_jit(sparse.structured_keep, p, axis=-1)(s))
  assert (~keep).sum() == round(p * shape[-1])
  mask = np.asarray(_jit(sparse.structured_mask, p, axis=-1)(s))
  np.testing.assert_array_equal(mask, np.broadcast_to(keep, shape))


def test_structured_heads_are_whole_groups():
  s = np.abs(_scores((16, 4 * 8), 1))  # 4 heads of 8 columns
  keep = np.asarray(sparse.structured_keep(s, 0.5, axis=1, group=8)).reshape(4, 8)
  assert keep.all(axis=1).sum() == 2 and (~keep).all(axis=1).sum() == 2
  head_scores = s.reshape(16, 4, 8).sum(axis=(0, 2))
  assert set(np.flatnonzero(keep[:, 0])) == set(np.argsort(head_scores)[2:])


def test_scores():
  w = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  x = jnp.array([[1.0, 0.0], [1.0, 2.0]])  # feature norms sqrt(2), 2
  np.testing.assert_allclose(sparse.wanda(w, sparse.input_norms(x)),
                             [[2**0.5, 2 * 2**0.5], [6.0, 1.0]], rtol=1e-6)
  np.testing.assert_array_equal(sparse.magnitude(w), jnp.abs(w))
  np.testing.assert_array_equal(sparse.apply_mask(w, w > 0), [[1.0, 0.0], [3.0, 0.5]])


@pytest.mark.parametrize("call,match", [
    (lambda s: sparse.unstructured_mask(s, 1.0), r"sparsity must be a number in \[0, 1\)"),
    (lambda s: sparse.unstructured_mask(s, -0.1), r"sparsity must be a number in \[0, 1\)"),
    (lambda s: sparse.nm_mask(s, 4, 2), "needs N <= M, got N=4 > M=2"),
    (lambda s: sparse.nm_mask(s, 2, 3), "size 8, not a multiple of M=3"),
    (lambda s: sparse.nm_mask(s, 0, 4), "n must be a positive int"),
    (lambda s: sparse.block_mask(s, 0.5, (8,)), r"block must be two positive ints"),
    (lambda s: sparse.block_mask(s[None], 0.5, (2, 2)), "needs a 2-D array"),
    (lambda s: sparse.structured_keep(s, 0.5, axis=1, group=3), "not a multiple of group=3"),
    (lambda s: sparse.unstructured_mask(s, 0.5, axis=2), "axis 2 is out of range"),
    (lambda s: sparse.wanda(s, jnp.ones(3)), r"x_norm shape \(3,\) must be \(8,\)"),
])
def test_bad_input_one_line_errors(call, match):
  with pytest.raises(ValueError, match=match) as e:
    call(jnp.ones((8, 4)))
  assert "\n" not in str(e.value)
