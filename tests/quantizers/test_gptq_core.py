"""GPTQ on arrays: beats round-to-nearest on correlated inputs; grids, act-order, dampening."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.quantizers.gptq_core import gptq, hessian, output_error, rtn
from jaxcomp.quant.dot import fake_quant_weight


def _correlated(k=64, n=48, tokens=1024, key=0):
  kz, ka, kw = jax.random.split(jax.random.key(key), 3)
  mix = jax.random.normal(ka, (k, k)) / np.sqrt(k) + 0.5 * jnp.eye(k)
  x = jax.random.normal(kz, (tokens, k)) @ mix  # strongly correlated input features
  return x, jax.random.normal(kw, (k, n))


@pytest.mark.parametrize("spec,act_order", [
    (jc.Quant(w_bits=4), False),
    (jc.Quant(w_bits=4), True),
    (jc.Quant(w_bits=3, group=16), False),
    (jc.Quant(w_bits=3, group=16), True),
    (jc.Quant(w_bits=4, w_symmetric=False), False),
], ids=str)
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
  x, w = _correlated()
  w_gptq, _, _, _ = gptq(w, hessian(x), spec, block_size=16, act_order=act_order)
  err_gptq, err_rtn = output_error(x, w, w_gptq), output_error(x, w, rtn(w, spec))
  assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_output_lies_on_the_grid():
  x, w = _correlated()
  spec = jc.Quant(w_bits=4, group=16)
  w_hat, step, _, _ = gptq(w, hessian(x), spec, block_size=32)
  s = np.abs(np.asarray(w)).reshape(4, 16, -1).max(axis=1) / 7  # static group scales
  q = np.asarray(w_hat).reshape(4, 16, -1) / s[:, None, :]
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  assert np.abs(np.round(q)).max() <= 7


def test_block_size_does_not_change_the_result():
  x, w = _correlated(k=32, n=8)
  a, _, _, _ = gptq(w, hessian(x), jc.Quant(w_bits=4), block_size=8)
  b, _, _, _ = gptq(w, hessian(x), jc.Quant(w_bits=4), block_size=32)
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_dead_inputs_and_non_pd_hessian_raise_dampening():
  x, w = _correlated(k=32, n=8)
  x = x.at[:, 3].set(0.0)  # a dead input feature: H has a zero row and column
  h = hessian(x[:8])  # 8 tokens for 32 features: H is singular
  w_hat, _, used, _ = gptq(w, h, jc.Quant(w_bits=4), damp=1e-12)
  assert used > 1e-12 and bool(jnp.all(jnp.isfinite(w_hat)))
  np.testing.assert_array_equal(np.asarray(w_hat[3]), 0.0)  # dead row quantized to zero


def test_bad_shapes():
  x, w = _correlated(k=32, n=8)
  with pytest.raises(ValueError, match="Hessian shape"):
    gptq(w, hessian(x)[:16, :16], jc.Quant(w_bits=4))
  with pytest.raises(ValueError, match="group=24 does not divide the input size 32"):
    gptq(w, hessian(x), jc.Quant(w_bits=4, group=24, calibration="mse"))


def test_shorter_last_group_matches_rtn_grid_and_beats_it():
  x, w = _correlated()  # K = 64: groups of 24, 24, 16
  spec = jc.Quant(w_bits=3, group=24)
  res = gptq(w, hessian(x), spec, block_size=16)
  assert res.step.shape == (3, w.shape[1])
  s_full = np.repeat(np.asarray(res.step), 24, axis=0)[:64]
  q = np.asarray(res.w_hat) / s_full
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(rtn(w, spec)),
                                np.asarray(fake_quant_weight(w, (0,), spec)))
  assert output_error(x, w, res.w_hat) < output_error(x, w, rtn(w, spec))


def test_keep_zeros_keeps_a_pruned_mask_and_compensates_it():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(512, 64)) * rng.uniform(0.2, 3, 64), jnp.float32)
  w = np.asarray(rng.normal(size=(64, 32)), np.float32)
  w[rng.random(w.shape) < 0.5] = 0.0  # a pruned kernel
  spec = jc.Quant(w_bits=4, group=32)
  h = hessian(x)
  kept = gptq(jnp.asarray(w), h, spec, keep_zeros=True, act_order=True).w_hat
  assert np.all(np.asarray(kept)[w == 0] == 0)
  free = np.asarray(gptq(jnp.asarray(w), h, spec, act_order=True).w_hat)
  assert np.any(free[w == 0] != 0)  # plain GPTQ fills the pruned weights back in
  rezeroed = np.where(w == 0, 0.0, free)  # zeroing them afterwards is never better
  err = lambda wh: output_error(x, jnp.asarray(w), jnp.asarray(wh))
  assert err(kept) <= err(rezeroed) * (1 + 1e-6)
