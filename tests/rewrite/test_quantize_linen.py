"""jc.quantize on Linen modules defined here; one numerics path shared with NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcomp as jc


class Net(nn.Module):
  """Dense, DenseGeneral, Einsum, Conv and a tied Embed, plus an unsupported LayerNorm."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(50, 16, name="embed")
    h = nn.relu(nn.Dense(32, name="up")(embed(tokens)))
    h = nn.DenseGeneral((2, 8), name="heads")(h)
    h = nn.Einsum((2, 8, 16), "bthk,hkd->btd", name="merge")(h)
    h = nn.Conv(16, (3,), name="conv")(nn.LayerNorm(name="norm")(h))
    return embed.attend(h)


TOKENS = jnp.arange(12).reshape(2, 6) % 50
W8A8 = jc.Quant(w_bits=8, a_bits=8)


def _recipe(spec):
  return jc.Recipe([jc.Rule("norm", skip=True), jc.Rule(".*", quant=spec)])


@pytest.fixture(scope="module")
def net():
  module = Net()
  return module, module.init(jax.random.key(0), TOKENS)


@pytest.mark.parametrize("spec", [W8A8, jc.Quant(w_bits=4, group=8, learn_scale=True)], ids=str)
def test_rewrite_is_pure_and_keeps_layout(net, spec):
  module, variables = net
  before = jax.tree.map(np.array, variables)
  qmodule, qvars = jc.quantize(module, _recipe(spec), variables=variables, args=(TOKENS,))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, variables))
  y, yq = jax.jit(module.apply)(variables, TOKENS), jax.jit(qmodule.apply)(qvars, TOKENS)
  rel = float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y))
  assert 0 < rel < (0.05 if spec.a_bits else 0.5)
  for name, p in variables["params"].items():  # same paths, same float weights
    for k, v in p.items():
      np.testing.assert_array_equal(qvars["params"][name][k], v)
  has_steps = {name for name, p in qvars["params"].items() if "w_step" in p}
  assert has_steps == ({"up", "heads", "merge", "conv", "embed"} if spec.learn_scale else set())
  grads = jax.jit(jax.grad(lambda v: qmodule.apply(v, TOKENS).sum()))(qvars)
  if spec.learn_scale:
    assert float(jnp.abs(grads["params"]["up"]["w_step"]).sum()) > 0


def test_report_and_strict(net):
  module, variables = net
  rep = jc.report(module, _recipe(W8A8), variables=variables, args=(TOKENS,))
  assert sorted(rep.matched[".*"]) == ["conv", "embed", "heads", "merge", "up"]
  assert rep.matched["norm"] == ["norm"] and rep.unused == []
  bad = jc.Recipe([jc.Rule(".*", quant=W8A8)])
  with pytest.raises(jc.RecipeError, match=r"strict: norm \(LayerNorm\)"):
    jc.quantize(module, bad, variables=variables, args=(TOKENS,), strict=True)
  with pytest.raises(TypeError, match="needs variables= and args="):
    jc.quantize(module, bad, variables=variables)


def test_init_of_quantized_module_creates_steps():
  qmodule = jc.quantize(Net(), _recipe(jc.Quant(w_bits=4, learn_scale=True)),
                        variables=Net().init(jax.random.key(0), TOKENS), args=(TOKENS,))[0]
  fresh = qmodule.init(jax.random.key(1), TOKENS)
  assert fresh["params"]["up"]["w_step"].shape == (1, 32)
  assert qmodule.apply(fresh, TOKENS).shape == (2, 6, 50)


class NnxTwin(nnx.Module):
  """The Linen Net's twin in NNX, to check that both front ends share the numerics."""

  def __init__(self, params):
    rngs = nnx.Rngs(0)
    self.embed = nnx.Embed(50, 16, rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.heads = nnx.LinearGeneral(32, (2, 8), rngs=rngs)
    self.merge = nnx.Einsum("bthk,hkd->btd", (2, 8, 16), (16,), rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)
    for name, p in params.items():
      layer = getattr(self, name)
      for k, v in p.items():
        getattr(layer, k)[...] = v

  def __call__(self, tokens):
    h = nnx.relu(self.up(self.embed(tokens)))
    h = self.conv(self.norm(self.merge(self.heads(h))))
    return self.embed.attend(h)


@pytest.mark.parametrize("spec", [W8A8, jc.Quant(w_bits=4, group=8)], ids=str)
def test_linen_and_nnx_give_the_same_quantized_outputs(net, spec):
  module, variables = net
  twin = NnxTwin(variables["params"])
  np.testing.assert_allclose(twin(TOKENS), module.apply(variables, TOKENS), rtol=1e-5, atol=1e-6)
  qmodule, qvars = jc.quantize(module, _recipe(spec), variables=variables, args=(TOKENS,))
  qtwin = jc.quantize(twin, _recipe(spec))
  np.testing.assert_allclose(qtwin(TOKENS), qmodule.apply(qvars, TOKENS), rtol=1e-5, atol=1e-6)
