"""jc.quantize on NNX models defined here: coverage of layer types, purity, reports, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.layers.quant import QuantDot, QuantEmbed, QuantScale
from jaxcomp.models import Llama, LlamaConfig


def _names(*names):
  return {"out_sharding": names, "eager_sharding": False}


class Net(nnx.Module):
  """Every layer type the quantizer covers, plus one it does not (LayerNorm)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(50, 16, rngs=rngs, embedding_metadata=_names("vocab", "embed"))
    self.up = nnx.Linear(16, 32, rngs=rngs, kernel_metadata=_names("embed", "mlp"))
    self.heads = nnx.LinearGeneral(32, (2, 8), rngs=rngs)
    self.merge = nnx.Einsum("bthk,hkd->btd", (2, 8, 16), rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.convs = nnx.List([nnx.Conv(16, 16, (3,), rngs=rngs)])

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = nnx.relu(self.up(h))
    h = self.merge(self.heads(h))
    h = self.convs[0](self.norm(h))
    return self.embed.attend(h)


TOKENS = jnp.arange(12).reshape(2, 6) % 50
W8A8 = jc.Quant(w_bits=8, a_bits=8)


def _recipe(spec, skip_norm=True):
  rules = [jc.Rule("norm", skip=True)] if skip_norm else []
  return jc.Recipe(rules + [jc.Rule(".*", quant=spec)])


@pytest.mark.parametrize("spec", [W8A8, jc.Quant(w_bits=4, group=8, learn_scale=True),
                                  jc.Quant(w_bits=8, a_bits=8, g_bits=8, learn_scale=True)], ids=str)
def test_rewrite_leaves_input_untouched(spec):
  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  before = jax.tree.map(np.array, state)
  y_before = model(TOKENS)
  qmodel = jc.quantize(model, _recipe(spec))
  nnx.grad(lambda m: qmodel(TOKENS).sum())(qmodel)  # use the new model
  graphdef2, state2 = nnx.split(model)
  assert graphdef2 == graphdef
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state2))
  np.testing.assert_array_equal(model(TOKENS), y_before)
  assert type(model.embed) is nnx.Embed and model.up.dot_general is jax.lax.dot_general
  assert qmodel is not model and type(qmodel.embed) is QuantEmbed


def test_every_layer_type_is_quantized_and_close():
  model = Net(nnx.Rngs(0))
  qmodel = jc.quantize(model, _recipe(W8A8))
  assert isinstance(qmodel.up.dot_general, QuantDot)
  assert isinstance(qmodel.heads.dot_general, QuantDot)
  assert type(qmodel.merge.einsum_op).__name__ == "QuantEinsum"
  assert type(qmodel.convs[0].conv_general_dilated).__name__ == "QuantConv"
  assert isinstance(qmodel.embed, QuantEmbed) and isinstance(qmodel.embed, nnx.Embed)
  y, yq = model(TOKENS), qmodel(TOKENS)
  rel = float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y))
  assert 0 < rel < 0.05
  # Same parameters, same names: the float weights are shared, not copied or changed.
  assert qmodel.up.kernel[...] is model.up.kernel[...]


def test_report_and_strict():
  model = Net(nnx.Rngs(0))
  recipe = jc.Recipe([jc.Rule("norm", skip=True), jc.Rule(r"up|heads", quant=W8A8),
                      jc.Rule(r"nothing_here", quant=W8A8), jc.Rule(r".*", quant=jc.Quant(w_bits=4))])
  rep = jc.report(model, recipe)
  assert rep.matched == {"norm": ["norm"], "up|heads": ["up", "heads"], "nothing_here": [],
                         ".*": ["embed", "merge", "convs/0"]} or sorted(rep.matched[".*"]) == [
                             "convs/0", "embed", "merge"]
  assert rep.unused == ["nothing_here"]
  assert "nothing_here" in str(rep)
  with pytest.raises(jc.RecipeError, match="strict: rule 'nothing_here' matched no layer"):
    jc.quantize(model, recipe, strict=True)
  with pytest.raises(jc.RecipeError, match=r"strict: norm \(LayerNorm\) matched a rule but "
                     "LayerNorm is not supported"):
    jc.quantize(model, _recipe(W8A8, skip_norm=False), strict=True)
  # Not strict: the unsupported norm is reported and left alone.
  q = jc.quantize(model, _recipe(W8A8, skip_norm=False))
  assert type(q.norm) is nnx.LayerNorm
  assert jc.report(model, _recipe(W8A8, skip_norm=False)).unsupported == [("norm", "LayerNorm")]


def test_group_that_does_not_divide_names_the_layer():
  with pytest.raises(jc.SpecError, match=r"^up: Quant.group=24 does not divide"):
    jc.quantize(Net(nnx.Rngs(0)), jc.Recipe([jc.Rule(
        "up", quant=jc.Quant(w_bits=4, group=24, calibration="percentile"))]))


def test_not_a_recipe_or_model():
  with pytest.raises(TypeError, match="recipe must be a jaxcomp.Recipe"):
    jc.quantize(Net(nnx.Rngs(0)), [jc.Rule(".*", quant=W8A8)])
  with pytest.raises(TypeError, match="expected a flax.nnx or flax.linen Module"):
    jc.quantize({"kernel": 1}, _recipe(W8A8))


def test_sharding_metadata_survives_and_steps_take_output_axes():
  model = Net(nnx.Rngs(0))
  q = jc.quantize(model, _recipe(jc.Quant(w_bits=4, learn_scale=True)))
  assert q.up.kernel.get_metadata("out_sharding") == ("embed", "mlp")
  step = q.up.dot_general.w_step
  assert isinstance(step, QuantScale) and step.shape == (1, 32)
  assert step.get_metadata("out_sharding") == (None, "mlp")
  assert q.embed.w_step.get_metadata("out_sharding") == ("vocab", None)
  assert q.embed.embedding.get_metadata("out_sharding") == ("vocab", "embed")


def test_lsq_steps_train():
  model = jc.quantize(Net(nnx.Rngs(0)), _recipe(jc.Quant(w_bits=4, learn_scale=True)))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  before = np.array(model.up.dot_general.w_step[...])

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(TOKENS) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert not np.allclose(before, model.up.dot_general.w_step[...])


def test_quantized_llama_on_8_device_mesh():
  """A quantized Llama (LSQ steps included) shards by its logical axes and runs under jit."""
  assert jax.device_count() >= 8
  cfg = LlamaConfig.tiny()
  model = Llama(cfg, rngs=nnx.Rngs(0))
  q = jc.quantize(model, jc.Recipe([
      jc.Rule(r"embed|.*norm", skip=True),
      jc.Rule(r".*", quant=jc.Quant(w_bits=8, a_bits=8, learn_scale=True))]), strict=True)
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size)
  expected = q(tokens)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("vocab", "model"), ("embed", None), ("q_heads", "model"), ("kv_heads", "model"),
           ("mlp", "model"), ("norm", None))
  with nnx.logical_axis_rules(rules):
    graphdef, state = nnx.split(q)
    shardings = nnx.get_named_sharding(state, mesh)
  state = jax.device_put(state, shardings)
  step = state["layers"][0]["mlp"]["up_proj"]["dot_general"]["w_step"]
  assert step.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "model")
  tokens = jax.device_put(tokens, jax.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  out = forward(state, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4, rtol=1e-4)
  assert out.sharding.spec[0] == "data"
