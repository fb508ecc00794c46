"""Non-finite values propagate, never hide: each numerics function's NaN / inf behaviour as its
docstring states it, `lsq_fake_quant`'s step validation, and the shared `check_finite`."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.quant import core, finite, qarray
from jaxcomp.quant.dot import fake_quant_weight

SETTINGS = hypothesis.settings(max_examples=10, deadline=None)
BAD = st.sampled_from([np.nan, np.inf, -np.inf])
K, N = 64, 24
W = np.asarray(jax.random.normal(jax.random.key(0), (K, N)), np.float32)

SPECS = [jc.Quant(w_bits=b, granularity=g, group=16 if g == "group" else None,
                  calibration=c, w_symmetric=sym, full_range=fr)
         for b, g, c, sym, fr in [(4, "channel", "absmax", True, False),
                                  (4, "group", "absmax", False, False),
                                  (3, "group", "percentile", True, False),
                                  (8, "tensor", "mse", True, False),
                                  (4, "channel", "mse", False, False),
                                  (4, "group", "absmax", True, True),
                                  (2, "channel", "percentile", False, False)]]


def _sharing(spec, k, n):
  """The (K, N) mask of the kernel elements sharing element (k, n)'s scale."""
  mask = np.zeros((K, N), bool)
  if spec.granularity == "tensor":
    mask[:] = True
  elif spec.granularity == "channel":
    mask[:, n] = True
  else:
    g = k // spec.group
    mask[g * spec.group:(g + 1) * spec.group, n] = True
  return mask


def _assert_propagated(out, clean, sharing):
  out, clean = np.asarray(out), np.asarray(clean)
  assert np.isnan(out[sharing]).all(), "an element sharing the bad scale came out finite"
  np.testing.assert_array_equal(out[~sharing], clean[~sharing])


@functools.cache
def _jitted(spec):
  return (jax.jit(lambda w: qarray.quantize_weight(w, (0,), spec).dequantize()),
          jax.jit(lambda w: fake_quant_weight(w, (0,), spec)))


@SETTINGS
@hypothesis.given(spec=st.sampled_from(SPECS), k=st.integers(0, K - 1), n=st.integers(0, N - 1),
                  bad=BAD)
def test_quantize_weight_and_fake_quant_weight_make_the_scale_group_nan(spec, k, n, bad):
  w = W.copy()
  w[k, n] = bad
  sharing = _sharing(spec, k, n)
  packed, fake = _jitted(spec)  # one program each per spec (eagerly, one per op)
  _assert_propagated(packed(w), packed(W), sharing)
  _assert_propagated(fake(w), fake(W), sharing)


@SETTINGS
@hypothesis.given(k=st.integers(0, K - 1), n=st.integers(0, N - 1), bad=BAD,
                  calibration=st.sampled_from(["absmax", "percentile", "mse"]),
                  symmetric=st.booleans())
def test_fake_quant_makes_the_slice_sharing_the_scale_nan(k, n, bad, calibration, symmetric):
  w = W.copy()
  w[k, n] = bad
  kw = dict(axes=0, calibration=calibration, symmetric=symmetric)
  sharing = np.zeros((K, N), bool)
  sharing[:, n] = True
  _assert_propagated(core.fake_quant(jnp.asarray(w), 4, **kw),
                     core.fake_quant(jnp.asarray(W), 4, **kw), sharing)
  s, z = core.compute_scale(jnp.asarray(w), 4, **kw)
  assert np.isnan(np.asarray(s)[0, n]) and np.isfinite(np.delete(np.asarray(s), n, 1)).all()
  assert z is None or np.isnan(np.asarray(z)[0, n])


def test_a_zero_slice_keeps_scale_one_and_a_nan_slice_a_nan_scale():
  x = jnp.array([[0.0, 1.0], [0.0, jnp.nan]])
  s, _ = core.compute_scale(x, 8, axes=0)
  assert float(s[0, 0]) == 1.0 and np.isnan(float(s[0, 1]))
  assert np.isnan(float(core.lsq_init(x, 8, axes=0)[0, 1]))


@SETTINGS
@hypothesis.given(k=st.integers(0, K - 1), n=st.integers(0, N - 1), bad=BAD,
                  spec=st.sampled_from(SPECS[:2]))
def test_quantize_with_step_makes_the_group_nan(k, n, bad, spec):
  """A given (solved / learned) step: the group holding the bad weight gets a NaN scale."""
  step = qarray.initial_step(jnp.asarray(W), (0,), spec)
  zero = None if spec.w_symmetric else jnp.zeros_like(step)
  w = W.copy()
  w[k, n] = bad
  pack = lambda w: qarray.quantize_with_step(w, (0,), step, spec.w_bits, spec.group,
                                             zero_point=zero).dequantize()
  _assert_propagated(pack(w), pack(W), _sharing(spec, k, n))


@SETTINGS
@hypothesis.given(i=st.integers(0, 31), bad=BAD)
def test_lsq_fake_quant_makes_the_element_nan(i, bad):
  """A learned step is not calibrated from x: only the bad element is affected."""
  x = np.linspace(-2, 2, 32, dtype=np.float32)
  step = jnp.full((1,), 0.1)
  clean = np.asarray(core.lsq_fake_quant(jnp.asarray(x), step, 4))
  x[i] = bad
  out = np.asarray(core.lsq_fake_quant(jnp.asarray(x), step, 4))
  assert np.isnan(out[i])
  np.testing.assert_array_equal(np.delete(out, i), np.delete(clean, i))
  # the straight-through gradient still flows for the finite elements
  g = jax.grad(lambda x: jnp.nansum(core.lsq_fake_quant(x, step, 4)))(jnp.asarray(x))
  assert np.isfinite(np.delete(np.asarray(g), i)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_step_makes_its_elements_nan(bad):
  step = jnp.array([[0.1, bad, 0.1]])
  f = jax.jit(lambda x, s: core.lsq_fake_quant(x, s, 4))  # traced: NaN is not refused
  for out in [f(jnp.ones((2, 3)), step)] + ([core.lsq_fake_quant(jnp.ones((2, 3)), step, 4)]
                                            if bad == np.inf else []):
    assert np.isnan(np.asarray(out[:, 1])).all() and np.isfinite(np.asarray(out[:, ::2])).all()


@pytest.mark.parametrize("step", [0.0, -0.5, np.array([[0.1, 0.0]]), jnp.array([[0.1, -1.0]]),
                                  np.float32(0.0), jnp.array([[jnp.nan, 0.1]])],
                         ids=["0", "neg", "np", "jax", "np_scalar", "nan"])
def test_lsq_fake_quant_refuses_a_concrete_step_that_is_not_positive(step):
  with pytest.raises(ValueError, match=r"^lsq_fake_quant: step must be > 0 everywhere, got "
                                       r"(-?\d|nan)") as e:
    core.lsq_fake_quant(jnp.ones((4, 2)), step, 4)
  assert "\n" not in str(e.value)


def test_a_traced_step_at_or_below_zero_gives_nan_not_a_silent_value():
  f = jax.jit(lambda x, s: core.lsq_fake_quant(x, s, 4))
  out = np.asarray(f(jnp.ones((4, 2)), jnp.array([[0.1, 0.0]])))
  assert np.isfinite(out[:, 0]).all() and np.isnan(out[:, 1]).all()
  out = np.asarray(f(jnp.ones((4, 2)), jnp.array([[-0.1, 0.1]])))
  assert np.isnan(out[:, 0]).all() and np.isfinite(out[:, 1]).all()


def test_grid_value_gives_nan_for_a_non_finite_input_instead_of_the_grid_edge():
  u = core.grid_value(jnp.array([1.0, jnp.inf, -jnp.inf, jnp.nan]), jnp.array(0.1), None, 4)
  np.testing.assert_array_equal(np.isnan(np.asarray(u)), [False, True, True, True])
  u = core.grid_value(jnp.array([1.0, jnp.inf]), jnp.array(0.1), jnp.array(-2.0), 4,
                      symmetric=False)
  assert float(u[0]) == 9.0  # clip(10 + z, -8, 7) - z with z = -2
  assert np.isnan(float(u[1]))


# --------------------------------------------------------------------------- check_finite


@SETTINGS
@hypothesis.given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=4), data=st.data(),
                  bad=BAD, use_numpy=st.booleans())
def test_first_nonfinite_finds_the_first_bad_index_in_row_major_order(shape, data, bad,
                                                                      use_numpy):
  x = np.ones(shape, np.float32)
  flat = data.draw(st.lists(st.integers(0, x.size - 1), min_size=1, max_size=3))
  for f in flat:
    x.reshape(-1)[f] = bad
  first = np.unravel_index(min(flat), shape) if shape else ()
  found = finite.first_nonfinite(x if use_numpy else jnp.asarray(x))
  assert found is not None
  assert found[0] == tuple(int(i) for i in first)
  assert repr(found[1]) == repr(float(bad))
  assert finite.first_nonfinite(np.ones(shape)) is None


def test_check_finite_names_the_first_bad_item_and_its_stacked_layer():
  stack = jnp.zeros((3, 4, 5)).at[1, 2, 3].set(jnp.nan)
  with pytest.raises(ValueError) as e:
    finite.check_finite([("a: kernel", jnp.ones(3)), ("blocks/up: kernel", stack, (0,)),
                         ("c: kernel", jnp.array([jnp.inf]))], refuses="t refuses it")
  assert str(e.value) == ("blocks/up: kernel has a non-finite value (nan) at index (2, 3) of "
                          "stacked layer 1; t refuses it")
  moved = jnp.moveaxis(stack, 0, 1)  # a Linen stack axis in the middle
  with pytest.raises(ValueError, match=r"index \(2, 3\) of stacked layer 1;"):
    finite.check_finite([("x", moved, (1,))], refuses="t")


def test_check_finite_skips_what_has_no_values_here():
  bad = jnp.array([jnp.nan])
  finite.check_finite([("abstract", jax.ShapeDtypeStruct((2,), jnp.float32)),
                       ("ints", jnp.array([1, 2])), ("none", None)], refuses="t")
  jax.jit(lambda x: finite.check_finite([("traced", x)], refuses="t") or x)(bad)
  jax.eval_shape(lambda x: finite.check_finite([("traced", x)], refuses="t") or x, bad)


def test_check_finite_checks_concrete_arrays_closed_over_by_a_trace():
  bad = jnp.array([1.0, jnp.nan])
  with pytest.raises(ValueError, match=r"closed has a non-finite value \(nan\) at index \(1,\)"):
    jax.eval_shape(lambda: finite.check_finite([("closed", bad)], refuses="t") or bad)
  jax.eval_shape(lambda: finite.check_finite([("closed", jnp.ones(2))], refuses="t"))


def test_check_finite_reads_numpy_in_chunks(monkeypatch):
  monkeypatch.setattr(finite, "_NUMPY_CHUNK", 7)
  x = np.ones((10, 10), np.float32)
  finite.check_finite([("x", x)], refuses="t")
  x[9, 9] = np.inf
  with pytest.raises(ValueError, match=r"x has a non-finite value \(inf\) at index \(9, 9\)"):
    finite.check_finite([("x", x)], refuses="t")


@pytest.mark.parametrize("value", [0, 0.0, -1e-3, float("nan"), float("inf"), True, "0.1", None])
def test_check_positive_refuses_what_is_not_a_finite_positive_number(value):
  with pytest.raises(ValueError, match=r"^f: damp must be a finite number > 0, got "):
    finite.check_positive("f", "damp", value)


def test_check_positive_accepts_positive_numbers():
  for value in (1, 0.01, np.float32(1e-6)):
    assert finite.check_positive("f", "damp", value) is None
