"""16-bit weight scales (`Quant.scale_dtype`): rounded up, the same grid in training and
serving, stored in 16 bits (w3g128 at 3.125 bits per weight)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.quant import core
from jaxcomp.quant import dot as qdot
from jaxcomp.quantizers import gptq_core


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(s=st.floats(2.0 ** -13, 1024.0, width=32))
def test_round_scale_up_is_the_smallest_value_of_the_dtype_at_or_above(dtype, s):
  up = float(core.round_scale_up(jnp.float32(s), dtype))
  assert up >= np.float32(s)
  assert float(np.float32(up).astype(dtype)) == up  # a value of the dtype
  below = float(jnp.nextafter(jnp.asarray(up, dtype), jnp.asarray(0, dtype)))
  assert below < np.float32(s)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("spec_kw", [dict(w_bits=8), dict(w_bits=3, group=128),
                                     dict(w_bits=4, group=32, w_symmetric=False),
                                     dict(w_bits=4, full_range=True)])
def test_sixteen_bit_scales_quantize_pack_and_serve_alike(dtype, spec_kw):
  w = jax.random.normal(jax.random.key(0), (256, 48)) * 0.05
  spec = jc.Quant(scale_dtype=dtype, **spec_kw)
  fq = qdot.fake_quant_weight(w, (0,), spec)
  qa = jc.quant.quantize_weight(w, (0,), spec)
  assert qa.scale.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(qa.dequantize(), fq)
  lo, hi = core.qrange(spec.w_bits, spec.w_symmetric, full_range=spec.full_range)
  ints = np.asarray(qa.ints())
  assert ints.min() >= lo and ints.max() <= hi
  assert ints.max() == hi or ints.min() == lo  # the grid's edge is still reached
  f32 = qdot.fake_quant_weight(w, (0,), jc.Quant(**spec_kw))
  err = lambda q: float(jnp.mean(jnp.square(q - w)))
  assert err(fq) <= 1.05 * err(f32)  # the rounded-up scale costs next to nothing


def test_w3g128_costs_3_125_bits_with_16_bit_scales():
  w = jnp.ones((512, 64))
  bits = lambda q: 8 * jc.quant.quantize_weight(w, (0,), q).nbytes / w.size
  assert bits(jc.Quant(w_bits=3, group=128)) == 3.25
  assert bits(jc.Quant(w_bits=3, group=128, scale_dtype="float16")) == 3.125


def test_gptq_and_ptq_keep_the_16_bit_grid():
  x = jax.random.normal(jax.random.key(1), (256, 64))
  w = jax.random.normal(jax.random.key(2), (64, 16))
  spec = jc.Quant(w_bits=4, group=32, method="gptq", scale_dtype="bfloat16")
  w_hat, step = gptq_core.gptq(w, gptq_core.hessian(x), spec)[:2]
  np.testing.assert_array_equal(step, step.astype(jnp.bfloat16).astype(jnp.float32))
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 256)
  ptq = jc.ptq(model, jc.Recipe([jc.Rule(r".*_proj", quant=spec)]), calib=tokens)
  packed = jc.convert(ptq)
  np.testing.assert_array_equal(packed(tokens), ptq(tokens))
  assert packed.layers[0].mlp.up_proj.kernel[...].scale.dtype == jnp.bfloat16


def test_sixteen_bit_scales_refuse_learned_and_float_format_scales():
  with pytest.raises(jc.SpecError, match="learn_scale and float formats keep float32"):
    jc.Quant(w_bits=4, learn_scale=True, scale_dtype="bfloat16")
  with pytest.raises(jc.SpecError, match="scale_dtype must be one of float32, bfloat16, float16"):
    jc.Quant(scale_dtype="float8")
