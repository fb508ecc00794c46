"""One NaN or inf in one weight: `jc.ptq` (every method), `jc.prune` and `jc.factorize` refuse
it once, before solving, with one line naming the layer, the first bad index and, for stacked
layers, the layer of the stack; non-finite calibration statistics are refused by layer too.
Before this, RTN / AWQ + convert laundered the NaN into code 0 (finite logits), and GPTQ
blamed the Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"
CALIB = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
KW = dict(batch_size=4, progress=False)

TRANSFORMS = {
    "ptq_rtn": (jc.ptq, dict(quant=jc.Quant(w_bits=4))),
    "ptq_gptq": (jc.ptq, dict(quant=jc.Quant(w_bits=4, method="gptq"))),
    "ptq_awq": (jc.ptq, dict(quant=jc.Quant(w_bits=4, group=32, method="awq"))),
    "ptq_smoothquant": (jc.ptq, dict(quant=jc.Quant(w_bits=8, a_bits=8, method="smoothquant"))),
    "prune_magnitude": (jc.prune, dict(sparsity=jc.Sparsity(sparsity=0.5))),
    "prune_wanda": (jc.prune, dict(sparsity=jc.Sparsity(sparsity=0.5, method="wanda"))),
    "prune_sparsegpt": (jc.prune, dict(sparsity=jc.Sparsity("2:4", method="sparsegpt"))),
    "factorize_svd": (jc.factorize, dict(lowrank=jc.LowRank(rank=8))),
    "factorize_svd_llm": (jc.factorize, dict(lowrank=jc.LowRank(rank=8, method="svd_llm"))),
}


@pytest.fixture(scope="module")
def llama():
  return Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))


def _poisoned(model, path, index, value):
  model = nnx.clone(model)
  var = jc.rewrite.engine.module_at(model, path).kernel
  var[...] = var[...].at[index].set(value)
  return model


def _run(name, model):
  fn, payload = TRANSFORMS[name]
  return fn(model, jc.Recipe([jc.Rule(PROJ, **payload)]), CALIB, **KW)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_one_bad_weight_is_refused_naming_the_layer(llama, name, bad):
  model = _poisoned(llama, "layers/1/attn/q_proj", (12, 40), bad)
  before = np.asarray(model.layers[1].attn.q_proj.kernel[...])
  fn = TRANSFORMS[name][0].__name__
  with pytest.raises(ValueError) as e:
    _run(name, model)
  assert str(e.value) == (f"layers/1/attn/q_proj: kernel has a non-finite value ({float(bad)!r}) "
                          f"at index (12, 40); jc.{fn} refuses non-finite weights")
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.q_proj.kernel[...]), before)


@pytest.mark.parametrize("name", ["ptq_rtn", "ptq_gptq", "prune_magnitude", "factorize_svd"])
def test_a_stacked_layer_names_its_layer_of_the_stack(llama, name):
  stacked = scan_layers(nnx.clone(llama))
  var = stacked.layers.mlp.down_proj.kernel
  var[...] = var[...].at[1, 5, 7].set(jnp.nan)
  fn = TRANSFORMS[name][0].__name__
  with pytest.raises(ValueError, match=r"^layers/mlp/down_proj: kernel has a non-finite value "
                                       r"\(nan\) at index \(5, 7\) of stacked layer 1; "
                                       rf"jc\.{fn} refuses non-finite weights$"):
    _run(name, stacked)


def test_layers_outside_the_recipe_are_not_checked(llama):
  """Only the weights a transform rewrites are its inputs: a NaN elsewhere propagates as the
  float model would (the transform does not hide it either)."""
  model = nnx.clone(llama)
  model.lm_head.kernel[...] = model.lm_head.kernel[...].at[0, 0].set(jnp.nan)
  q = _run("ptq_rtn", model)
  assert bool(jnp.isnan(q(CALIB[:1])).any())


@pytest.mark.parametrize("name", ["ptq_gptq", "ptq_awq", "prune_wanda", "factorize_svd_llm"])
def test_non_finite_calibration_statistics_are_refused_naming_the_layer(llama, name):
  """Finite weights, but an inf embedding row the calibration tokens use: every later
  activation is NaN, and the first solved layer's statistics are refused."""
  model = nnx.clone(llama)
  emb = model.embed.embedding
  emb[...] = emb[...].at[int(CALIB[0, 0])].set(jnp.inf)  # not matched by the recipe
  with pytest.raises(ValueError, match=r"^layers/0/(attn|mlp)/\w+_proj: calibration statistic "
                                       r"\w+ has a non-finite value \((nan|inf)\) at index "
                                       r"\(\d+(, \d+)?,?\); the solvers refuse non-finite "
                                       r"calibration statistics") as e:
    _run(name, model)
  assert "\n" not in str(e.value)


def test_the_check_does_not_break_tracing(llama):
  """Abstract models trace through (`nnx.eval_shape`): nothing concrete, nothing checked."""
  model = _poisoned(llama, "layers/0/mlp/up_proj", (0, 0), jnp.nan)
  recipe = jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(w_bits=4))])
  out = nnx.eval_shape(lambda m: jc.ptq(m, recipe, progress=False), model)
  leaves = jax.tree.leaves(nnx.state(out, nnx.Param))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
