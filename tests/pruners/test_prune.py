"""`jc.prune` over NNX models: exact sparsity per pattern, Wanda / SparseGPT vs magnitude on the
model output, purity, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"


@pytest.fixture(scope="module")
def setup():
  model = Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))
  calib = jax.random.randint(jax.random.key(1), (16, 32), 0, 256)
  tokens = jax.random.randint(jax.random.key(2), (4, 32), 0, 256)
  return model, calib, tokens


def _prune(model, calib, spec, **kw):
  out, results = jc.prune(model, jc.Recipe([jc.Rule(PROJ, sparsity=spec)]), calib, batch_size=8,
                 progress=False, return_report=True, **kw)
  return out, results


def _kernels(model):
  return {f"{i}/{n}": np.asarray(getattr(getattr(l, g), n).kernel[...])
          for i, l in enumerate(model.layers)
          for g, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))) for n in names}


@pytest.mark.parametrize("spec", [
    jc.Sparsity(sparsity=0.5), jc.Sparsity(sparsity=0.5, method="wanda"),
    jc.Sparsity(sparsity=0.5, method="sparsegpt"), jc.Sparsity("2:4"),
    jc.Sparsity("2:4", method="wanda"), jc.Sparsity("4:8", method="sparsegpt"),
    jc.Sparsity("block", sparsity=0.75, block=(8, 8)),
    jc.Sparsity("block", sparsity=0.5, block=(16, 16), method="wanda"),
], ids=lambda s: f"{s.pattern}-{s.method}")
def test_exact_sparsity_every_pattern(setup, spec):
  model, calib, _ = setup
  before = _kernels(model)
  pruned, results = _prune(model, calib, spec)
  for name, w in _kernels(pruned).items():
    zeros = int((w == 0).sum())
    if spec.nm is not None:
      n, m = spec.nm
      np.testing.assert_array_equal((w.reshape(-1, m, w.shape[1]) != 0).sum(axis=1), n)
    elif spec.method == "wanda" and spec.pattern == "unstructured":  # per output column
      np.testing.assert_array_equal((w == 0).sum(axis=0), round(0.5 * w.shape[0]))
    else:
      unit = 1 if spec.pattern == "unstructured" else spec.block[0] * spec.block[1]
      assert zeros == round(spec.sparsity * w.size / unit) * unit, name
  assert len(results) == 14
  for name, w in _kernels(model).items():  # the input model is untouched
    np.testing.assert_array_equal(w, before[name])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_the_output(setup, pattern):
  model, calib, tokens = setup
  ref = model(tokens)
  err = {}
  for method in ("magnitude", "wanda", "sparsegpt"):
    pruned, _ = _prune(model, calib, jc.Sparsity(pattern, sparsity=0.5, method=method))
    err[method] = float(jnp.sum((pruned(tokens) - ref) ** 2) / jnp.sum(ref ** 2))
  assert err["sparsegpt"] < err["magnitude"], err
  assert err["wanda"] < err["magnitude"], err


def test_sparsegpt_reports_layer_errors_and_mixed_rules(setup):
  model, calib, _ = setup
  recipe = jc.Recipe([
      jc.Rule(r".*attn/\w+_proj", sparsity=jc.Sparsity(sparsity=0.3), name="attn"),
      jc.Rule(r".*mlp/\w+_proj", sparsity=jc.Sparsity("2:4", method="sparsegpt"), name="mlp"),
  ])
  _, results = jc.prune(model, recipe, calib, progress=False, return_report=True)
  by_method = {r.method for r in results}
  assert by_method == {"magnitude", "sparsegpt"}
  assert all(np.isfinite(r.error) and 0 < r.error < 1 for r in results
             if r.method == "sparsegpt")


def test_magnitude_needs_no_calibration_and_prunes_conv():
  model = nnx.Sequential(nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  pruned = jc.prune(model, jc.Recipe([jc.Rule(".*", sparsity=jc.Sparsity(sparsity=0.5))]))
  assert int((pruned.layers[0].kernel[...] == 0).sum()) == 144  # of 3 * 3 * 4 * 8
  assert int((pruned.layers[1].kernel[...] == 0).sum()) == 16


def test_bad_input(setup):
  model, calib, _ = setup
  wanda = jc.Recipe([jc.Rule(PROJ, sparsity=jc.Sparsity(method="wanda"), name="proj")])
  with pytest.raises(ValueError, match="calib is missing; rule 'proj' has Sparsity.method='wanda'"):
    jc.prune(model, wanda)
  with pytest.raises(ValueError, match=r"needs the input size 64 to be a multiple of M=3"):
    jc.prune(model, jc.Recipe([jc.Rule(PROJ, sparsity=jc.Sparsity("1:3"))]))
  with pytest.raises(jc.RecipeError, match=r"strict: .*embed"):
    jc.prune(model, jc.Recipe([jc.Rule("embed", sparsity=jc.Sparsity(method="wanda"))]), calib,
             strict=True)
  with pytest.raises(TypeError, match="expected a flax.nnx Module"):
    jc.prune(object(), wanda)
