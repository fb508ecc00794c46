"""GPTQ, SparseGPT and SVD-LLM on arrays with bad inputs: a non-finite kernel or Hessian is
refused as such (one line, naming the input and the first bad index; never blamed on the
Hessian's definiteness, never solved into silent NaNs), and ``damp`` must be > 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp import lowrank
from jaxcomp.pruners.sparsegpt_core import sparsegpt
from jaxcomp.quantizers.gptq_core import gptq, hessian, rtn

X = jax.random.normal(jax.random.key(0), (256, 32))
W = jax.random.normal(jax.random.key(1), (32, 16))
H = hessian(X)


def _one_line(e):
  assert "\n" not in str(e.value), str(e.value)
  assert "positive definite" not in str(e.value)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("solve", ["gptq", "sparsegpt"])
def test_a_non_finite_kernel_is_refused_naming_it(bad, solve):
  fn = (lambda w, h: gptq(w, h, jc.Quant(w_bits=4))) if solve == "gptq" else (
      lambda w, h: sparsegpt(w, h, sparsity=0.5))
  value = repr(float(bad))
  with pytest.raises(ValueError, match=rf"^{solve}: the kernel w has a non-finite value "
                                       rf"\({value}\) at index \(3, 7\); {solve} refuses "
                                       "non-finite inputs$") as e:
    fn(W.at[3, 7].set(bad), H)
  _one_line(e)


@pytest.mark.parametrize("solve", ["gptq", "sparsegpt"])
def test_a_non_finite_hessian_is_refused_naming_it(solve):
  fn = (lambda w, h: gptq(w, h, jc.Quant(w_bits=4))) if solve == "gptq" else (
      lambda w, h: sparsegpt(w, h, sparsity=0.5))
  with pytest.raises(ValueError, match=rf"^{solve}: the Hessian h has a non-finite value "
                                       r"\(nan\) at index \(5, 0\)") as e:
    fn(W, H.at[5, 0].set(jnp.nan))
  _one_line(e)


@pytest.mark.parametrize("damp", [0.0, -0.01, float("nan"), float("inf")])
def test_damp_must_be_positive(damp):
  for fn, name in [(lambda: gptq(W, H, jc.Quant(w_bits=4), damp=damp), "gptq"),
                   (lambda: sparsegpt(W, H, sparsity=0.5, damp=damp), "sparsegpt"),
                   (lambda: lowrank.svd_llm_factor(W, H, 4, damp=damp), "svd_llm_factor")]:
    with pytest.raises(ValueError, match=rf"^{name}: damp must be a finite number > 0, got "):
      fn()


def test_a_singular_hessian_still_raises_the_dampening():
  """The refusal is for non-finite inputs only: a finite singular H is still solved."""
  h = hessian(X[:8])  # rank 8 of 32
  w_hat, _, used, _ = gptq(W, h, jc.Quant(w_bits=4), damp=1e-12)
  assert used > 1e-12 and bool(jnp.isfinite(w_hat).all())


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=4), jc.Quant(w_bits=3, group=8),
                                  jc.Quant(w_bits=4, granularity="tensor"),
                                  jc.Quant(w_bits=4, w_symmetric=False, calibration="mse")],
                         ids=str)
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_rtn_makes_the_elements_sharing_the_scale_nan(spec, bad):
  out, clean = np.asarray(rtn(W.at[10, 3].set(bad), spec)), np.asarray(rtn(W, spec))
  sharing = np.zeros(W.shape, bool)
  if spec.granularity == "tensor":
    sharing[:] = True
  elif spec.granularity == "group":
    sharing[8:16, 3] = True
  else:
    sharing[:, 3] = True
  assert np.isnan(out[sharing]).all()
  np.testing.assert_array_equal(out[~sharing], clean[~sharing])
