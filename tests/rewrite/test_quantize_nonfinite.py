"""`jc.quantize` (NNX and Linen) and the Linen one-shot transforms refuse one NaN / inf weight
with one line naming the layer, the first bad index and, for a stacked layer (``nnx.vmap`` /
``nn.scan``), its layer of the stack; abstract inputs (``eval_shape``) are not checked and
still trace."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import meta

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers
from linen_styles import LoopLM, ScanLM

TOKENS = jnp.arange(12).reshape(2, 6) % 50
Q4 = jc.Quant(w_bits=4, group=8)


@pytest.fixture(scope="module")
def llama():
  return Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))


def _recipe(**payload):
  return jc.Recipe([jc.Rule(r".*norm.*", skip=True), jc.Rule(".*", **payload)])


@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("where", ["layers/0/attn/q_proj", "embed"])
def test_nnx_quantize_refuses_one_bad_weight(llama, where, learn_scale):
  model = nnx.clone(llama)
  node = jc.rewrite.engine.module_at(model, where)
  var = node.embedding if where == "embed" else node.kernel
  var[...] = var[...].at[3, 9].set(jnp.nan)
  name = "embedding" if where == "embed" else "kernel"
  with pytest.raises(ValueError) as e:
    jc.quantize(model, _recipe(quant=jc.Quant(w_bits=4, learn_scale=learn_scale)))
  assert str(e.value) == (f"{where}: {name} has a non-finite value (nan) at index (3, 9); "
                          "jc.quantize refuses non-finite weights")


def test_nnx_quantize_of_a_stack_names_the_layer(llama):
  model = scan_layers(nnx.clone(llama))
  var = model.layers.attn.v_proj.kernel
  var[...] = var[...].at[1, 2, 3].set(jnp.inf)
  with pytest.raises(ValueError, match=r"^layers/attn/v_proj: kernel has a non-finite value "
                                       r"\(inf\) at index \(2, 3\) of stacked layer 1; "
                                       "jc.quantize refuses non-finite weights$"):
    jc.quantize(model, _recipe(quant=jc.Quant(w_bits=8)))


def test_nnx_quantize_still_traces(llama):
  model = nnx.clone(llama)
  model.layers[0].mlp.up_proj.kernel[...] = jnp.full_like(model.layers[0].mlp.up_proj.kernel[...],
                                                          jnp.nan)
  out = nnx.eval_shape(lambda m: jc.quantize(m, _recipe(quant=jc.Quant(w_bits=4))), model)
  leaves = jax.tree.leaves(nnx.state(out, nnx.Param))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@functools.cache
def _scan_lm(axis=0):
  module = ScanLM(scan_axis=axis)
  return module, module.init(jax.random.key(0), TOKENS)


def _poison(variables, path, index, value=jnp.nan):
  """A copy of ``variables`` with one element of params/<path> set to ``value``."""
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  new = jax.tree.map(lambda x: x, variables, is_leaf=is_box)
  *parents, last = path.split("/")
  node = new["params"]
  for key in parents:
    node = node[key]
  box = node[last]
  value_ = box.value if isinstance(box, meta.Partitioned) else box
  changed = value_.at[index].set(value)
  node[last] = box.replace(value=changed) if isinstance(box, meta.Partitioned) else changed
  return new


@pytest.mark.parametrize("axis", [0, 1])
def test_linen_quantize_of_a_scanned_stack_names_the_layer(axis):
  module, variables = _scan_lm(axis)
  index = (2, 4, 5) if axis == 0 else (4, 2, 5)  # layer 2, element (4, 5) of its kernel
  bad = _poison(variables, "layers/up/kernel", index)
  with pytest.raises(ValueError, match=r"^layers/up: kernel has a non-finite value \(nan\) at "
                                       r"index \(4, 5\) of stacked layer 2; jc.quantize refuses "
                                       "non-finite weights$"):
    jc.quantize(module, _recipe(quant=Q4), variables=bad, args=(TOKENS,))


def test_linen_quantize_refuses_an_embedding_and_traces_abstract_variables():
  module = LoopLM()
  variables = module.init(jax.random.key(0), TOKENS)
  bad = _poison(variables, "embed/embedding", (7, 1), jnp.inf)
  with pytest.raises(ValueError, match=r"^embed: embedding has a non-finite value \(inf\) at "
                                       r"index \(7, 1\); jc.quantize"):
    jc.quantize(module, _recipe(quant=Q4), variables=bad, args=(TOKENS,))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), meta.unbox(bad))
  _, qvars = jc.quantize(module, _recipe(quant=Q4), variables=abstract, args=(TOKENS,))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(qvars))


@pytest.mark.parametrize("fn,payload", [
    (jc.ptq, dict(quant=jc.Quant(w_bits=4, group=8))),
    (jc.ptq, dict(quant=jc.Quant(w_bits=4, group=8, method="gptq"))),
    (jc.prune, dict(sparsity=jc.Sparsity(sparsity=0.5, method="wanda"))),
    (jc.factorize, dict(lowrank=jc.LowRank(rank=4))),
], ids=["ptq_rtn", "ptq_gptq", "prune_wanda", "factorize_svd"])
def test_linen_one_shot_transforms_refuse_a_bad_stacked_weight(fn, payload):
  module, variables = _scan_lm(0)
  bad = _poison(variables, "layers/up/kernel", (1, 0, 3), -jnp.inf)
  recipe = jc.Recipe([jc.Rule(r"layers/up", **payload)])
  with pytest.raises(ValueError, match=r"^layers/up: kernel has a non-finite value \(-inf\) at "
                                       rf"index \(0, 3\) of stacked layer 1; jc\.{fn.__name__} "
                                       "refuses non-finite weights$"):
    fn(module, recipe, TOKENS, variables=bad, progress=False, batch_size=2)


def test_linen_calibration_statistics_are_refused_naming_the_layer():
  module, variables = _scan_lm(0)
  bad = _poison(variables, "embed/embedding", (int(TOKENS[0, 0]), 0), jnp.inf)  # not solved
  recipe = jc.Recipe([jc.Rule(r"layers/up", quant=jc.Quant(w_bits=4, group=8, method="gptq"))])
  with pytest.raises(ValueError, match=r"^layers\[0\]/up: calibration statistic \w+ has a "
                                       r"non-finite value"):
    jc.ptq(module, recipe, TOKENS, variables=bad, progress=False, batch_size=2)
