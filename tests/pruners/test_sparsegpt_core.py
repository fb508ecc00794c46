"""SparseGPT on arrays: exact sparsity / N:M, beats magnitude and Wanda on correlated inputs,
joint quantization on the grid, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp import sparse
from jaxcomp.quantizers.gptq_core import hessian, output_error
from jaxcomp.pruners.sparsegpt_core import sparsegpt


def _correlated(k=64, n=48, tokens=1024, key=0):
  kz, ka, kw = jax.random.split(jax.random.key(key), 3)
  mix = jax.random.normal(ka, (k, k)) / np.sqrt(k) + 0.5 * jnp.eye(k)
  x = jax.random.normal(kz, (tokens, k)) @ mix
  return x, jax.random.normal(kw, (k, n))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_unstructured_exact_and_better_than_magnitude_and_wanda(p):
  x, w = _correlated()
  r = sparsegpt(w, hessian(x), sparsity=p, block_size=16)
  assert int((~r.mask).sum()) == round(p * w.size)
  assert bool(jnp.all(r.w_hat[~r.mask] == 0))
  mag = sparse.apply_mask(w, sparse.unstructured_mask(sparse.magnitude(w), p))
  wanda = sparse.apply_mask(w, sparse.unstructured_mask(
      sparse.wanda(w, sparse.input_norms(x)), p, axis=0))
  err = output_error(x, w, r.w_hat)
  assert err < 0.8 * output_error(x, w, mag), (err, output_error(x, w, mag))
  assert err < 0.8 * output_error(x, w, wanda), (err, output_error(x, w, wanda))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_holds_in_every_group_and_beats_magnitude(nm):
  n, m = nm
  x, w = _correlated()
  r = sparsegpt(w, hessian(x), nm=nm, block_size=32)
  kept = np.asarray(r.mask).reshape(-1, m, w.shape[1]).sum(axis=1)
  np.testing.assert_array_equal(kept, n)
  assert bool(jnp.all(r.w_hat[~r.mask] == 0))
  mag = sparse.apply_mask(w, sparse.nm_mask(sparse.magnitude(w), n, m))
  assert output_error(x, w, r.w_hat) < 0.7 * output_error(x, w, mag)


def test_joint_quantization_lies_on_the_grid():
  x, w = _correlated()
  spec = jc.Quant(w_bits=4, group=16)
  r = sparsegpt(w, hessian(x), nm=(2, 4), spec=spec, block_size=32)
  assert r.step.shape == (4, 48)
  q = np.asarray(r.w_hat).reshape(4, 16, -1) / np.asarray(r.step)[:, None, :]
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  assert np.abs(np.round(q)).max() <= 7
  assert bool(jnp.all(r.w_hat[~r.mask] == 0))


def test_zero_sparsity_without_spec_reproduces_the_kernel():
  x, w = _correlated(k=32, n=8)
  r = sparsegpt(w, hessian(x), sparsity=0.0, block_size=8)
  assert bool(r.mask.all())
  np.testing.assert_allclose(r.w_hat, w, atol=1e-5)


def test_errors():
  x, w = _correlated(k=32, n=8)
  h = hessian(x)
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
    sparsegpt(w, h, sparsity=1.0)
  with pytest.raises(ValueError, match="needs ints 0 < N <= M, got N=4, M=2"):
    sparsegpt(w, h, nm=(4, 2))
  with pytest.raises(ValueError, match="must be multiples of M=3"):
    sparsegpt(w, h, nm=(1, 3))
  with pytest.raises(ValueError, match="does not match kernel"):
    sparsegpt(w, h[:16, :16])
