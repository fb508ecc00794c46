"""One grouping rule for kernels that contract several axes: groups run along the flattened
contracting axis K (the QArray layout) in fake quantization, LSQ steps, GPTQ and convert, so a
group may span heads (LinearGeneral / MultiHeadAttention out-projections ``(H, Dh, D)`` with
``Dh < group``) or the taps of a convolution (3x3 with 3 input channels, group 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcomp as jc

LSQ = jc.Quant(w_bits=4, group=128, learn_scale=True)


def _train_steps(model, x, n=2):
  """A few SGD steps on every param (kernel and LSQ steps move)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)
  for _ in range(n):
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.grad(loss)(params))
  return nnx.merge(graphdef, params, rest)


def _check_packed(qmodel, x, name_path):
  packed = jc.convert(qmodel)
  layer = packed
  for key in name_path:
    layer = getattr(layer, key)
  assert isinstance(layer.kernel[...], jc.QArray)
  np.testing.assert_allclose(np.asarray(packed(x)), np.asarray(qmodel(x)), rtol=1e-5, atol=1e-5)


class OutProj(nnx.Module):

  def __init__(self, rngs):
    self.out = nnx.LinearGeneral((4, 64), 256, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    return self.out(x)


class ConvNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


class Attn(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=256, qkv_features=256,
                                       decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


def test_lsq_on_linear_general_head_spanning_groups():
  model = OutProj(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4, 64))
  q = jc.quantize(model, jc.Recipe([jc.Rule("out", quant=LSQ)]), strict=True)
  step = q.out.dot_general.w_step
  assert step.shape == (1, 2, 256)  # K = 4 * 64 = 256 -> 2 groups of 128, spanning 2 heads
  q = _train_steps(q, x)
  _check_packed(q, x, ("out",))


def test_lsq_on_conv_with_three_input_channels_group_8():
  model = ConvNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  spec = jc.Quant(w_bits=4, group=8, learn_scale=True)
  q = jc.quantize(model, jc.Recipe([jc.Rule("conv", quant=spec)]), strict=True)
  assert q.conv.conv_general_dilated.w_step.shape == (1, 1, 4, 8)  # 27 taps: 3 x 8 + 3
  q = _train_steps(q, x)
  packed = jc.convert(q)
  np.testing.assert_allclose(np.asarray(packed(x)), np.asarray(q(x)), rtol=1e-5, atol=1e-5)


def test_lsq_on_multi_head_attention_out_projection():
  model = Attn(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 256))
  q = jc.quantize(model, jc.Recipe([jc.Rule(r"attn/(query|key|value|out)", quant=LSQ)]),
                  strict=True)
  assert q.attn.out.dot_general.w_step.shape == (1, 2, 256)
  assert q.attn.query.dot_general.w_step.shape == (2, 4, 64)
  q = _train_steps(q, x)
  _check_packed(q, x, ("attn", "out"))


def test_gptq_on_linear_general_head_spanning_groups():
  model = OutProj(nnx.Rngs(0))
  calib = jax.random.normal(jax.random.key(2), (16, 8, 4, 64))
  spec = jc.Quant(w_bits=4, group=128, method="gptq")
  q, results = jc.ptq(model, jc.Recipe([jc.Rule("out", quant=spec)]), calib, progress=False,
                      return_report=True, calib_dtype=None)
  assert [r.path for r in results] == ["out"] and 0 < results[0].error < 0.1
  assert q.out.dot_general.w_step.shape == (1, 2, 256)
  x = calib[:2]
  rtn = jc.quantize(model, jc.Recipe([jc.Rule("out", quant=jc.Quant(w_bits=4, group=128))]))
  ref = model(calib)
  err = lambda m: float(jnp.mean((m(calib) - ref) ** 2))
  assert err(q) < err(rtn)  # GPTQ beats round-to-nearest on its calibration inputs
  _check_packed(q, x, ("out",))


def _gptq_beats_rtn(model, rule, spec, calib):
  """GPTQ through jc.ptq: lower output error than RTN on its calibration inputs."""
  q, results = jc.ptq(model, jc.Recipe([jc.Rule(rule, quant=spec)]), calib, progress=False,
                      return_report=True, calib_dtype=None)
  assert [r.path for r in results] == [rule] and 0 < results[0].error < 0.2, results
  rtn_spec = jc.Quant(w_bits=spec.w_bits, group=spec.group, w_symmetric=spec.w_symmetric)
  rtn = jc.quantize(model, jc.Recipe([jc.Rule(rule, quant=rtn_spec)]))
  ref = model(calib)
  err = lambda m: float(jnp.mean((m(calib) - ref) ** 2))
  assert err(q) < err(rtn), (err(q), err(rtn))
  return q


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_on_conv_with_three_input_channels_group_8(symmetric):
  model = ConvNet(nnx.Rngs(0))
  calib = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
  spec = jc.Quant(w_bits=3, group=8, method="gptq", w_symmetric=symmetric)
  q = _gptq_beats_rtn(model, "conv", spec, calib)
  hook = q.conv.conv_general_dilated
  assert hook.w_step.shape == (1, 1, 4, 8)  # 27 taps: 3 x 8 + 3
  assert (hook.w_zero is None) == symmetric
  packed = jc.convert(q)
  assert isinstance(packed.conv.kernel[...], jc.QArray)
  np.testing.assert_allclose(np.asarray(packed(calib)), np.asarray(q(calib)), rtol=1e-5,
                             atol=1e-5)


def test_gptq_on_multi_head_attention_out_projection():
  model = Attn(nnx.Rngs(0))
  calib = jax.random.normal(jax.random.key(2), (8, 6, 256))
  spec = jc.Quant(w_bits=3, group=128, method="gptq", options={"act_order": True})
  q = _gptq_beats_rtn(model, "attn/out", spec, calib)
  assert q.attn.out.dot_general.w_step.shape == (1, 2, 256)  # groups span two heads
  _check_packed(q, calib[:2], ("attn", "out"))


def test_calibrated_pruning_on_conv_uses_its_input_patches():
  model = ConvNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3)) * jnp.array([0.1, 1.0, 10.0])
  rule = lambda m: jc.Recipe([jc.Rule("conv", sparsity=jc.Sparsity(sparsity=0.5, method=m))])
  ref = model(x)
  err = lambda m: float(jnp.mean((m(x) - ref) ** 2))
  wanda = jc.prune(model, rule("wanda"), x, progress=False, calib_dtype=None)
  magnitude = jc.prune(model, rule("magnitude"), progress=False)
  per_output = jnp.sum(wanda.conv.kernel[...] == 0, axis=(0, 1, 2))  # K = 27 per output
  assert set(np.asarray(per_output).tolist()) <= {13, 14}, per_output
  assert err(wanda) < err(magnitude)  # the input scale per channel is seen through the patches


def test_linen_dense_general_and_attention_groups_across_heads():
  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      y = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256, name="attn")(x)
      return nn.DenseGeneral(256, axis=(-2, -1), name="proj")(y.reshape(*y.shape[:-1], 4, 64))

  x = jax.random.normal(jax.random.key(1), (2, 6, 256))
  module = Block()
  variables = module.init(jax.random.key(0), x)
  recipe = jc.Recipe([jc.Rule(r"attn/(query|key|value|out)|proj", quant=LSQ)])
  qmodule, qvars = jc.quantize(module, recipe, variables=variables, args=(x,), strict=True)
  assert qvars["params"]["proj"]["w_step"].shape == (1, 2, 256)
  assert qvars["params"]["attn"]["out"]["w_step"].shape == (1, 2, 256)
  qmodule, packed = jc.convert(qmodule, variables=qvars, args=(x,))
  np.testing.assert_allclose(np.asarray(qmodule.apply(packed, x)),
                             np.asarray(qmodule.apply(qvars, x)), rtol=1e-5, atol=1e-5)
