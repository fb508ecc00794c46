"""`jc.convert` refuses a NaN / inf in what it packs (a quantized layer's kernel, step, zero
points, input smoothing) with one line naming the layer: the packed model can no longer give
finite logits for a model whose float logits are NaN (a NaN became code 0 on scale 1.0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"
CALIB = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)


@pytest.fixture(scope="module")
def llama():
  return Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))


def _recipe(spec):
  return jc.Recipe([jc.Rule(PROJ, quant=spec)])


def _set(var, index, value):
  var[...] = var[...].at[index].set(value)


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=4), jc.Quant(w_bits=4, learn_scale=True),
                                  jc.Quant(w_bits=8, a_bits=8)], ids=str)
def test_a_bad_kernel_is_refused(llama, spec):
  q = jc.quantize(llama, _recipe(spec))
  _set(q.layers[1].attn.q_proj.kernel, (12, 40), jnp.nan)
  with pytest.raises(ValueError) as e:
    jc.convert(q)
  assert str(e.value) == ("layers/1/attn/q_proj: kernel has a non-finite value (nan) at index "
                          "(12, 40); jc.convert refuses non-finite weights")


def test_a_bad_learned_step_is_refused(llama):
  q = jc.quantize(llama, _recipe(jc.Quant(w_bits=4, group=16, learn_scale=True)))
  _set(q.layers[0].mlp.up_proj.dot_general.w_step, (1, 3), jnp.inf)
  with pytest.raises(ValueError, match=r"^layers/0/mlp/up_proj: w_step has a non-finite value "
                                       r"\(inf\) at index \(1, 3\); jc.convert"):
    jc.convert(q)


def test_a_bad_smoothing_of_a_ptq_model_is_refused(llama):
  q = jc.ptq(llama, _recipe(jc.Quant(w_bits=4, group=32, method="awq")), CALIB, batch_size=4,
             progress=False)
  _set(q.layers[0].attn.k_proj.dot_general.in_scale, (5,), jnp.nan)
  with pytest.raises(ValueError, match=r"^layers/0/attn/k_proj: in_scale has a non-finite "
                                       r"value \(nan\) at index \(5,\); jc.convert"):
    jc.convert(q)


def test_a_bad_stacked_kernel_names_its_layer(llama):
  q = jc.quantize(scan_layers(nnx.clone(llama)), _recipe(jc.Quant(w_bits=4)))
  _set(q.layers.mlp.gate_proj.kernel, (1, 2, 3), -jnp.inf)
  with pytest.raises(ValueError, match=r"^layers/mlp/gate_proj: kernel has a non-finite value "
                                       r"\(-inf\) at index \(2, 3\) of stacked layer 1;"):
    jc.convert(q)


def test_clean_models_convert_and_abstract_skeletons_still_trace(llama):
  q = jc.quantize(llama, _recipe(jc.Quant(w_bits=4)))
  tokens = CALIB[:1]
  np.testing.assert_array_equal(np.asarray(jc.convert(q)(tokens)), np.asarray(q(tokens)))
  like = nnx.eval_shape(lambda: jc.packed_skeleton(
      Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0)), _recipe(jc.Quant(w_bits=4))))
  assert isinstance(like, Llama)


class Net(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(50, 16, name="embed")(tokens)
    return nn.Dense(8, name="out")(nn.relu(nn.Dense(32, name="up")(h)))


@pytest.mark.parametrize("param,index", [("kernel", (3, 4)), ("w_step", (0, 6))])
def test_linen_convert_refuses_a_bad_kernel_or_step(param, index):
  tokens = jnp.arange(12).reshape(2, 6) % 50
  module = Net()
  variables = module.init(jax.random.key(0), tokens)
  recipe = jc.Recipe([jc.Rule("up|out", quant=jc.Quant(w_bits=4, learn_scale=True))])
  qmodule, qvars = jc.quantize(module, recipe, variables=variables, args=(tokens,))
  qvars = jax.tree.map(lambda x: x, qvars)
  qvars["params"]["up"][param] = qvars["params"]["up"][param].at[index].set(jnp.nan)
  with pytest.raises(ValueError, match=rf"^up: {param} has a non-finite value \(nan\) at index "
                                       rf"\({index[0]}, {index[1]}\); jc.convert refuses "
                                       "non-finite weights$"):
    jc.convert(qmodule, variables=qvars, args=(tokens,))
