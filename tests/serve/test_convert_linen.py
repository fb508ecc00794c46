"""jc.convert on Linen: packed variables, outputs equal to the fake-quant module's, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxcomp as jc
from jaxcomp.quant.qarray import QArray
from jaxcomp.rewrite.linen_quant import PackedParam


class Net(nn.Module):
  """Dense, DenseGeneral, Einsum, Conv and a tied Embed, plus an unquantized LayerNorm."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(50, 16, name="embed")
    h = nn.relu(nn.Dense(32, name="up")(embed(tokens)))
    h = nn.DenseGeneral((2, 8), name="heads")(h)
    h = nn.Einsum((2, 8, 16), "bthk,hkd->btd", name="merge")(h)
    h = nn.Conv(16, (3,), name="conv")(nn.LayerNorm(name="norm")(h))
    return embed.attend(h)


TOKENS = jnp.arange(12).reshape(2, 6) % 50
LAYERS = ("up", "heads", "merge", "conv", "embed")


def _quantized(spec):
  module = Net()
  variables = module.init(jax.random.key(0), TOKENS)
  recipe = jc.Recipe([jc.Rule("norm", skip=True), jc.Rule(".*", quant=spec)])
  return jc.quantize(module, recipe, variables=variables, args=(TOKENS,))


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=8, a_bits=8),
    jc.Quant(w_bits=4, group=8),
    jc.Quant(w_bits=4, learn_scale=True),
], ids=str)
def test_packed_outputs_equal_fake_quant(spec):
  qmodule, qvars = _quantized(spec)
  before = jax.tree.map(np.array, qvars)
  module, packed = jc.convert(qmodule, variables=qvars, args=(TOKENS,))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, qvars))  # untouched
  for name in LAYERS:
    box = packed["params"][name]["embedding" if name == "embed" else "kernel"]
    assert isinstance(box, PackedParam) and isinstance(box.value, QArray)
    assert box.value.packed == (spec.w_bits <= 4)
    assert "w_step" not in packed["params"][name]
  want = qmodule.apply(qvars, TOKENS)
  np.testing.assert_array_equal(np.asarray(module.apply(packed, TOKENS)), np.asarray(want))
  # Under jit XLA fuses the fake-quant and the dequantize graphs differently: float rounding.
  np.testing.assert_allclose(np.asarray(jax.jit(module.apply)(packed, TOKENS)),
                             np.asarray(jax.jit(qmodule.apply)(qvars, TOKENS)),
                             rtol=1e-5, atol=1e-6)


def test_lsq_steps_after_training_are_packed_exactly():
  qmodule, qvars = _quantized(jc.Quant(w_bits=4, group=8, learn_scale=True))
  opt = optax.adam(1e-2)
  state = opt.init(qvars["params"])

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean(qmodule.apply({"params": p}, TOKENS) ** 2))(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  params = qvars["params"]
  for _ in range(3):
    params, state = step(params, state)
  module, packed = jc.convert(qmodule, variables={"params": params}, args=(TOKENS,))
  np.testing.assert_array_equal(np.asarray(module.apply(packed, TOKENS)),
                                np.asarray(qmodule.apply({"params": params}, TOKENS)))


def test_bad_input():
  qmodule, qvars = _quantized(jc.Quant(w_bits=8))
  with pytest.raises(TypeError, match="needs variables= and args="):
    jc.convert(qmodule, variables=qvars)
  with pytest.raises(TypeError, match="must be the QuantizedLinen"):
    jc.convert(Net(), variables=qvars, args=(TOKENS,))
  _, packed = jc.convert(qmodule, variables=qvars, args=(TOKENS,))
  _, again = jc.convert(qmodule, variables=packed, args=(TOKENS,))  # already packed: kept
  assert again["params"]["up"]["kernel"] is packed["params"]["up"]["kernel"]
  plain = Net().init(jax.random.key(0), TOKENS)
  empty = jc.quantize(Net(), jc.Recipe([jc.Rule("nothing", quant=jc.Quant(w_bits=8))]),
                      variables=plain, args=(TOKENS,))[0]
  with pytest.raises(ValueError, match="no quantized layers"):
    jc.convert(empty, variables=plain, args=(TOKENS,))


def test_save_restore_packed_linen_variables(tmp_path):
  qmodule, qvars = _quantized(jc.Quant(w_bits=4, group=8))
  module, packed = jc.convert(qmodule, variables=qvars, args=(TOKENS,))
  size = jc.save_packed(packed, tmp_path / "linen")
  assert size.packed_params == sum(
      int(np.prod(packed["params"][n]["embedding" if n == "embed" else "kernel"].value.shape))
      for n in LAYERS)
  like = jax.eval_shape(lambda: jc.convert(qmodule, variables=qvars, args=(TOKENS,))[1])
  restored = jc.restore_packed(tmp_path / "linen", like)
  assert isinstance(restored["params"]["up"]["kernel"], PackedParam)
  np.testing.assert_array_equal(np.asarray(module.apply(restored, TOKENS)),
                                np.asarray(module.apply(packed, TOKENS)))
  with pytest.raises(TypeError, match="expected a converted NNX model or Linen variables"):
    jc.save_packed(module, tmp_path / "bad")
