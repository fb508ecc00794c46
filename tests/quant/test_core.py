"""Numerics on plain arrays: grids, scales, quantize/dequantize, STE and LSQ gradients."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import core

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=16),
                    elements=finite)


@pytest.mark.parametrize("bits,sym,expected", [(8, True, (-127, 127)), (4, True, (-7, 7)),
                                               (2, True, (-1, 1)), (8, False, (-128, 127)),
                                               (4, False, (-8, 7))])
def test_qrange(bits, sym, expected):
  assert core.qrange(bits, sym) == expected


@SETTINGS
@hypothesis.given(x=arrays, bits=st.integers(2, 8), sym=st.booleans())
@hypothesis.example(x=np.array([250.0, 500.0], np.float32), bits=8, sym=False)  # a rounding tie
def test_roundtrip_error_within_half_step(x, bits, sym):
  """Inside the calibrated range, |dequantize(quantize(x)) - x| <= scale / 2."""
  @jax.jit  # one program per example (eagerly, every op compiles per shape)
  def roundtrip(x):
    s, z = core.compute_scale(x, bits, axes=None, symmetric=sym)
    return s, core.dequantize(core.quantize(x, s, z, bits=bits, symmetric=sym), s, z)
  s, x_hat = roundtrip(x)
  err = np.abs(np.asarray(x_hat) - x)
  # plus float32 rounding of x / s and q * s, a few ulps of |x| (x = [250, 500], 8 bits
  # asymmetric: a tie at 127.5 steps is off by 5.5e-6 of s / 2)
  assert np.all(err <= np.asarray(s) / 2 * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(x))


@SETTINGS
@hypothesis.given(x=arrays, bits=st.integers(2, 8), sym=st.booleans())
def test_fake_quant_idempotent(x, bits, sym):
  """Quantizing an already quantized tensor with its own scale changes nothing."""
  s, z = jax.jit(lambda x: core.compute_scale(x, bits, axes=None, symmetric=sym))(x)
  fq = jax.jit(lambda x, s, z: core.fake_quant_with_scale(x, s, z, bits, sym))  # one program
  once = fq(jnp.asarray(x), s, z)
  twice = fq(once, s, z)
  np.testing.assert_allclose(twice, once, rtol=0, atol=float(np.max(s)) * 1e-4)


@SETTINGS
@hypothesis.given(x=arrays, bits=st.integers(2, 8), sym=st.booleans(),
                  calib=st.sampled_from(["absmax", "percentile", "mse"]))
def test_fake_quant_equals_quantize_dequantize(x, bits, sym, calib):
  x = jnp.asarray(x)
  axes = 0 if x.ndim > 1 else None
  # two jitted programs per example (eagerly, every op compiles per shape)
  fq = jax.jit(lambda x: core.fake_quant(x, bits, axes=axes, symmetric=sym, calibration=calib,
                                         percentile=99.0))(x)
  @jax.jit
  def ref(x):
    s, z = core.compute_scale(x, bits, axes=axes, symmetric=sym, calibration=calib,
                              percentile=99.0)
    return core.dequantize(core.quantize(x, s, z, bits=bits, symmetric=sym), s, z)
  ref = ref(x)
  np.testing.assert_array_equal(np.asarray(fq), np.asarray(ref))


def test_per_channel_scale_shapes_and_values():
  w = jnp.array([[1.0, -4.0, 0.0], [2.0, 0.5, 0.0]])
  s, z = core.compute_scale(w, 8, axes=0)
  assert s.shape == (1, 3) and z is None
  np.testing.assert_allclose(s[0], [2 / 127, 4 / 127, 1.0])  # all-zero column: scale 1.


def test_asymmetric_zero_is_exact_and_range_used():
  x = jnp.array([0.0, 0.1, 0.5, 3.0])
  s, z = core.compute_scale(x, 4, symmetric=False)
  q = core.quantize(x, s, z, bits=4, symmetric=False)
  assert int(q[0]) == int(z[0])  # zero maps onto the zero point exactly
  assert core.dequantize(q, s, z)[0] == 0.0
  assert int(q.min()) == -8 and int(q.max()) == 7  # the full 16 levels


def test_mse_calibration_not_worse_than_absmax():
  x = jax.random.t(jax.random.key(0), 3.0, (64, 256))  # heavy tails
  err = {}
  for calib in ("absmax", "mse"):
    err[calib] = float(jnp.sum((core.fake_quant(x, 4, axes=1, calibration=calib) - x) ** 2))
  assert err["mse"] < err["absmax"]


def test_percentile_clips():
  x = jnp.concatenate([jnp.linspace(-1, 1, 999), jnp.array([100.0])])
  s, _ = core.compute_scale(x, 8, calibration="percentile", percentile=99.0)
  assert float(s[0]) < 2.0 / 127  # the outlier does not set the scale


def test_ste_gradient_is_clipped_identity():
  """d fake_quant / dx = 1 inside the grid's range, 0 where the calibration clipped."""
  x = jnp.concatenate([jnp.linspace(-1, 1, 99), jnp.array([50.0])])
  g = jax.grad(lambda x: core.fake_quant(x, 8, calibration="percentile", percentile=99.0).sum())(x)
  s, _ = core.compute_scale(x, 8, calibration="percentile", percentile=99.0)
  inside = np.abs(np.asarray(x)) <= 127 * float(s[0])
  np.testing.assert_allclose(np.asarray(g), inside.astype(np.float32), rtol=1e-6, atol=0)
  assert not inside[-1] and inside[:-1].all()


def test_ste_gradient_absmax_is_identity_including_the_extremes():
  x = jax.random.normal(jax.random.key(1), (8, 32))
  g = jax.grad(lambda x: (core.fake_quant(x, 4, axes=1) * 3.0).sum())(x)
  np.testing.assert_allclose(np.asarray(g), np.full(x.shape, 3.0, np.float32), rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_match_analytic(bits):
  """LSQ (Esser et al., 2020, eq. 3): dx_hat/ds = -x/s + round(x/s) inside, qmin/qmax outside,
  times g = 1/sqrt(N Qp); dx_hat/dx = 1 inside, 0 outside."""
  x = jax.random.normal(jax.random.key(bits), (16, 6)) * 2.0
  step = jnp.full((1, 6), 0.3)
  qmin, qmax = core.qrange(bits)
  upstream = jax.random.normal(jax.random.key(9), x.shape)

  def f(x, s):
    return jnp.sum(core.lsq_fake_quant(x, s, bits) * upstream)

  gx, gs = jax.grad(f, (0, 1))(x, step)
  v = np.asarray(x) / 0.3
  inside = (np.round(v) >= qmin) & (np.round(v) <= qmax)
  ds = np.where(inside, np.round(v) - v, np.where(v < 0, qmin, qmax))
  g = 1.0 / np.sqrt(16 * qmax)  # 16 elements share each column's step
  expected_s = np.sum(ds * np.asarray(upstream), axis=0, keepdims=True) * g
  np.testing.assert_allclose(np.asarray(gs), expected_s, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(upstream) * inside, rtol=1e-6, atol=0)


def test_lsq_grad_scale_value():
  assert core.lsq_grad_scale(1024, 4, 8) == pytest.approx(1 / np.sqrt(256 * 127))


def test_lsq_init_formula():
  x = jnp.array([[1.0, -3.0], [-1.0, 1.0]])
  np.testing.assert_allclose(core.lsq_init(x, 4, axes=0), [[2 * 1.0 / np.sqrt(7), 2 * 2.0 / np.sqrt(7)]])


def test_quantize_per_token():
  x = jax.random.normal(jax.random.key(2), (3, 5, 16))
  q, s = core.quantize_per_token(x)
  assert q.dtype == jnp.int8 and s.shape == (3, 5, 1)
  np.testing.assert_array_equal(np.max(np.abs(np.asarray(q)), axis=-1), 127)
  assert float(jnp.max(jnp.abs(q * s - x) - s / 2)) <= 1e-6


def test_full_signed_grid_is_gptqs_reference_grid():
  """``full_range``: {-2^(b-1) .. 2^(b-1) - 1} * absmax / (2^(b-1) - 1/2), 16 levels at 4 bits."""
  assert core.qrange(4, full_range=True) == (-8, 7) and core.qrange(4) == (-7, 7)
  x = jnp.array([-1.0, -0.5, 0.0, 0.3, 1.0])
  s, z = core.compute_scale(x, 4, full_range=True)
  assert z is None and np.isclose(float(s[0]), 1.0 / 7.5)
  q = core.quantize(x, s, bits=4, full_range=True)
  np.testing.assert_array_equal(np.asarray(q), [-7, -4, 0, 2, 7])  # +absmax: 7.5 clips to 7
  assert int(core.quantize(jnp.array([-1.1]), s, bits=4, full_range=True)[0]) == -8
  np.testing.assert_allclose(np.asarray(core.fake_quant_with_scale(x, s, None, 4, full_range=True)),
                             np.asarray(q, np.float32) / 7.5, rtol=1e-6)
