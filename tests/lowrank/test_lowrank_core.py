"""Low-rank factors: full rank reproduces the kernel, SVD-LLM minimises the output error,
ASVD helps on outlier features, rank choices, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import lowrank


def _data(k=48, n=40, tokens=512, key=0):
  kx, ka, kw = jax.random.split(jax.random.key(key), 3)
  scales = jnp.exp(jax.random.normal(ka, (k,)))  # features of very different size
  mix = jax.random.normal(kx, (k, k)) / np.sqrt(k) + jnp.eye(k)
  x = (jax.random.normal(jax.random.key(key + 7), (tokens, k)) @ mix) * scales
  return x, jax.random.normal(kw, (k, n))


def _out_err(x, w, a, b):
  return float(jnp.sum((x @ w - (x @ a) @ b) ** 2) / jnp.sum((x @ w) ** 2))


def test_full_rank_reproduces_the_kernel():
  x, w = _data()
  r = min(w.shape)
  for a, b in (lowrank.svd_factor(w, r),
               lowrank.asvd_factor(w, jnp.mean(jnp.abs(x), 0), r),
               lowrank.svd_llm_factor(w, x.T @ x, r)):
    assert a.shape == (48, r) and b.shape == (r, 40)
    np.testing.assert_allclose(a @ b, w, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitening_beats_plain_and_activation_aware_svd_on_the_output(rank):
  x, w = _data()
  err_svd = _out_err(x, w, *lowrank.svd_factor(w, rank))
  err_asvd = _out_err(x, w, *lowrank.asvd_factor(w, jnp.mean(jnp.abs(x), 0), rank))
  err_llm = _out_err(x, w, *lowrank.svd_llm_factor(w, x.T @ x, rank))
  assert err_llm < err_asvd < err_svd, (err_llm, err_asvd, err_svd)


def test_svd_is_the_best_weight_approximation():
  x, w = _data()
  a, b = lowrank.svd_factor(w, 8)
  a2, b2 = lowrank.svd_llm_factor(w, x.T @ x, 8)
  assert jnp.linalg.norm(w - a @ b) < jnp.linalg.norm(w - a2 @ b2)


def test_ranks():
  assert lowrank.rank_for_reduction(576, 1536, 0.2) == 335
  k, n = 576, 1536
  for red in (0.2, 0.4):
    r = lowrank.rank_for_reduction(k, n, red)
    assert r * (k + n) <= (1 - red) * k * n < (r + 1) * (k + n)
  assert lowrank.rank_for_reduction(8, 4, 0.0) == 2
  assert lowrank.rank_for_energy(jnp.array([3.0, 2.0, 1.0]), 1.0) == 3
  assert lowrank.rank_for_energy(jnp.array([3.0, 2.0, 1.0]), 0.5) == 1


def test_errors():
  w = jnp.ones((8, 4))
  with pytest.raises(ValueError, match=r"rank 5 is above min\(in, out\) = min\(8, 4\)"):
    lowrank.svd_factor(w, 5)
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lowrank.svd_factor(w, 0)
  with pytest.raises(ValueError, match=r"h shape \(4, 4\) must be \(8, 8\)"):
    lowrank.svd_llm_factor(w, jnp.eye(4), 2)
  with pytest.raises(ValueError, match=r"reduction must be in \[0, 1\)"):
    lowrank.rank_for_reduction(8, 4, 1.0)
  with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
    lowrank.rank_for_energy(jnp.ones(3), 0.0)
