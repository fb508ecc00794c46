"""Float element formats (jaxcomp/quant/formats.py): the fp8 and e2m1 grids exact on every
representable value, round to nearest even, saturation, NaN handling; MX and NV scales."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcomp.quant import formats

NAMES = tuple(formats.FLOAT_FORMATS)


def _code(value: float, name: str) -> int:
  """The format's bit pattern of representable ``value``."""
  return int(np.array([value]).astype(formats.float_format(name).dtype.type).view(np.uint8)[0])


def _reference(v: np.ndarray, name: str) -> np.ndarray:
  """Nearest representable value by brute force (ties to the even code), saturating, NaN for
  non-finite."""
  values = formats.representable(name)
  out = np.empty_like(v, dtype=np.float64)
  for i, x in enumerate(v):
    if not np.isfinite(x):
      out[i] = np.nan
      continue
    x = float(np.clip(x, values[0], values[-1]))
    d = np.abs(values - x)
    best = np.flatnonzero(d == d.min())
    if len(best) == 2:  # a tie: the even code
      best = [j for j in best if _code(values[j], name) % 2 == 0]
    out[i] = values[best[0]]
  return out


@pytest.mark.parametrize("name", NAMES)
def test_every_representable_value_is_kept_and_the_table_is_complete(name):
  values = formats.representable(name)
  fmt = formats.float_format(name)
  expected = {"e4m3": 253, "e5m2": 247, "e2m1": 15}[name]  # finite values, one zero
  assert len(values) == expected and values[-1] == fmt.fmax == -values[0]
  got = np.asarray(formats.round_to_float(jnp.asarray(values, jnp.float32), name))
  np.testing.assert_array_equal(got, values.astype(np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_midpoints_round_to_the_even_neighbour(name):
  values = formats.representable(name)
  mid = (values[:-1] + values[1:]) / 2
  mid32 = mid.astype(np.float32)
  exact = mid32.astype(np.float64) == mid  # midpoints float32 holds exactly (all of them here)
  assert exact.all()
  got = np.asarray(formats.round_to_float(jnp.asarray(mid32), name)).astype(np.float64)
  for m, g, lo, hi in zip(mid, got, values[:-1], values[1:]):
    assert g in (lo, hi), (m, g)
    assert _code(g, name) % 2 == 0, (m, g)  # ties to the even code


@functools.cache
def _round_to_float(name):
  return jax.jit(lambda v: formats.round_to_float(v, name))


@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(data=st.data())
def test_random_values_round_to_the_nearest_and_saturate(name, data):
  fmax = formats.float_format(name).fmax
  xs = data.draw(st.lists(st.floats(-3 * fmax, 3 * fmax, width=32), min_size=1, max_size=40))
  v = np.asarray(xs, np.float32)
  # one shape (zero-padded to 40) and one jitted program per format for all examples
  padded = np.zeros(40, np.float32)
  padded[:len(v)] = v
  got = np.asarray(_round_to_float(name)(padded))[:len(v)]
  np.testing.assert_array_equal(got, _reference(v.astype(np.float64), name).astype(np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_values_come_out_nan_and_saturation_is_explicit(name):
  fmax = formats.float_format(name).fmax
  v = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 10 * fmax, -10 * fmax, 1e30])
  got = np.asarray(formats.round_to_float(v, name))
  assert np.isnan(got[:3]).all()
  np.testing.assert_array_equal(got[3:], [fmax, -fmax, fmax])
  # What a plain cast would do instead (why saturation and NaN are explicit).
  plain = np.asarray(v.astype(formats.float_format(name).dtype).astype(jnp.float32))
  assert not np.array_equal(np.nan_to_num(plain, nan=-1.0), np.nan_to_num(got, nan=-1.0))


@pytest.mark.parametrize("name", NAMES)
def test_straight_through_gradient_inside_the_range_only(name):
  fmax = formats.float_format(name).fmax
  v = jnp.array([0.3, -0.7 * fmax, fmax, 1.5 * fmax, -2 * fmax])
  g = jax.grad(lambda v: formats.round_to_float(v, name).sum())(v)
  np.testing.assert_array_equal(g, [1.0, 1.0, 1.0, 0.0, 0.0])


def test_float_scale_maps_absmax_onto_fmax():
  x = jnp.array([[1.0, -896.0, 0.0], [0.5, 3.0, 0.0], [jnp.nan, 1.0, 0.0]])
  s = formats.float_scale(x[:2], "e4m3", axes=0)
  np.testing.assert_allclose(s, [[1 / 448, 2.0, 1.0]], rtol=1e-7)
  assert np.isnan(formats.float_scale(x, "e4m3", axes=0)[0, 0])
  assert formats.float_scale(x[:2], "e5m2").shape == (1, 1)


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(st.floats(1e-30, 1e30))
def test_mx_scale_is_a_power_of_two_putting_the_block_max_in_the_top_binade(amax):
  s = float(formats.mx_scale(jnp.float32(amax)))
  assert np.log2(s) == np.round(np.log2(s))
  v = np.float32(amax) / s
  assert 4.0 <= v < 8.0  # [2^emax, 2^(emax+1)) for E2M1: above 6 saturates, as the spec says


def test_mx_scale_zero_and_non_finite_blocks():
  s = formats.mx_scale(jnp.array([0.0, jnp.nan, jnp.inf]))
  assert float(s[0]) == 1.0 and np.isnan(s[1:]).all()


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=16))
def test_nv_scale_block_scales_are_e4m3_values_within_its_precision(amaxes):
  amax = jnp.asarray(amaxes, jnp.float32)
  b, g = formats.nv_scale(amax, jnp.max(amax))
  b = np.asarray(b)
  assert np.log2(float(g)) == np.round(np.log2(float(g)))  # a power of two: b * g exact
  np.testing.assert_array_equal(b.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), b)
  assert b.max() <= 448.0
  ideal = np.asarray(amax) / (6 * float(g))
  normal = ideal >= 2.0 ** -6  # E4M3's smallest normal; below it the step is absolute
  np.testing.assert_allclose(b[normal], ideal[normal], rtol=2.0 ** -4)
  np.testing.assert_allclose(b[~normal], np.maximum(ideal[~normal], 2.0 ** -9), atol=2.0 ** -10)
  assert (b > 0).all()  # a tiny block keeps E4M3's smallest scale, never 0


def test_unknown_format_is_one_line():
  with pytest.raises(ValueError, match="float format must be one of e4m3, e5m2, e2m1; got 'e3m4'"):
    formats.round_to_float(jnp.zeros(2), "e3m4")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "mxfp4", "nvfp4"])
def test_format_scale_keeps_every_block_on_the_grid(fmt):
  x = jax.random.normal(jax.random.key(0), (8, 4, 32)) * jnp.exp(
      jax.random.normal(jax.random.key(1), (8, 4, 1)) * 3)
  s = formats.format_scale(x, fmt, axes=2)
  elem = formats.element_format(fmt)
  v = np.asarray(x / s)
  fmax = formats.float_format(elem).fmax
  top = np.abs(v).max(axis=2)
  if fmt == "mxfp4":
    assert ((top >= 4) & (top < 8)).all()  # the top binade, saturating above 6
  elif fmt == "nvfp4":  # the E4M3 block scale rounds to nearest: a little above 6 saturates
    amax = np.abs(np.asarray(x)).max(axis=2)
    b, g = formats.nv_scale(jnp.asarray(amax), amax.max())
    normal = np.asarray(b) >= 2.0 ** -6  # subnormal block scales round coarser
    assert normal.mean() > 0.7 and (top[normal] <= fmax / (1 - 2.0 ** -4) * (1 + 1e-6)).all()
    np.testing.assert_array_equal(np.asarray(s)[..., 0], np.asarray(b) * np.asarray(g))
  else:
    np.testing.assert_allclose(top, fmax, rtol=1e-6)
  q = np.asarray(formats.round_to_float(jnp.asarray(v), elem))
  assert np.isin(q, formats.representable(elem)).all()
  bad = formats.format_scale(x.at[0, 0, 0].set(jnp.nan), fmt, axes=2)
  assert np.isnan(bad[0, 0]).all()
  assert (np.isnan(bad).all() if fmt == "nvfp4" else np.isfinite(bad[1:]).all())
