"""Float element formats through `jc.Quant`: the spec's implied bits and blocks, QAT fake
quantization (weights and fp8 activations), GPTQ and RTN on the float grids (issue 20)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.quant import dot as qdot
from jaxcomp.quant import formats
from jaxcomp.quantizers import gptq_core

W_FORMATS = ("e4m3", "e5m2", "mxfp4", "nvfp4")


def test_formats_set_their_bits_and_blocks():
  assert jc.Quant(w_format="e4m3").w_bits == 8
  mx = jc.Quant(w_format="mxfp4")
  assert (mx.w_bits, mx.group, mx.granularity) == (4, 32, "group")
  nv = jc.Quant(w_format="nvfp4", w_bits=4, group=16)
  assert (nv.w_bits, nv.group) == (4, 16)
  assert jc.Quant(w_format="e4m3", a_format="e4m3").a_bits == 8
  assert not jc.Quant(w_format="e4m3", a_format="e4m3").int_dot
  assert jc.Quant.from_dict(nv.to_dict()) == nv


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_format="fp8"), "Quant.w_format must be one of int, e4m3, e5m2, mxfp4, nvfp4"),
    (dict(w_format="e4m3", w_bits=4), "stores 8-bit values; got w_bits=4"),
    (dict(w_format="mxfp4", group=64), "blocks of 32 by definition; got group=64"),
    (dict(w_format="nvfp4", granularity="tensor"), "blocks of 16 by definition"),
    (dict(w_format="e4m3", w_symmetric=False), "drop w_symmetric=False"),
    (dict(w_format="e5m2", learn_scale=True), "drop learn_scale=True"),
    (dict(w_format="e4m3", calibration="mse"), "drop calibration='mse'"),
    (dict(a_format="e4m3", a_bits=4), "8-bit symmetric format; got a_bits=4"),
    (dict(w_format="e4m3", a_bits=8, g_bits=8), "g_bits (int8 backward dots) needs"),
    (dict(w_format="mxfp4", method="awq"), "awq' searches clipping ratios on integer grids"),
])
def test_bad_format_specs_are_one_line(kwargs, message):
  with pytest.raises(jc.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
    jc.Quant(**kwargs)


def _reference(w, fmt, group=None):
  """Fake quantization of a (K, N) kernel by hand: blocks along K, scale per (block, column)."""
  k, n = w.shape
  g = group or k
  blocks = w.reshape(k // g, g, n)
  s = formats.format_scale(blocks, fmt, axes=1)
  v = formats.round_to_float(blocks / s, formats.element_format(fmt))
  return (v * s).reshape(k, n)


@pytest.mark.parametrize("fmt", W_FORMATS)
def test_fake_quant_weight_is_the_format_grid(fmt):
  w = jax.random.normal(jax.random.key(0), (64, 24))
  spec = jc.Quant(w_format=fmt)
  got = qdot.fake_quant_weight(w, (0,), spec)
  np.testing.assert_array_equal(got, _reference(w, fmt, spec.group))
  # every weight divided by its scale is a value of the element format
  err = np.abs(np.asarray(got - w)).max() / np.abs(np.asarray(w)).max()
  assert 0 < err < {"e4m3": 0.04, "e5m2": 0.08, "mxfp4": 0.4, "nvfp4": 0.2}[fmt]


def test_fp8_activations_and_the_ste():
  x = jax.random.normal(jax.random.key(1), (5, 64))
  w = jax.random.normal(jax.random.key(2), (64, 24))
  spec = jc.Quant(w_format="e4m3", a_format="e4m3")
  dims = (((1,), (0,)), ((), ()))
  y = qdot.quant_dot_general(x, w, dims, spec)
  s = formats.format_scale(x, "e4m3", axes=1)
  x_hat = formats.round_to_float(x / s, "e4m3") * s
  np.testing.assert_allclose(y, x_hat @ _reference(w, "e4m3"), rtol=1e-5, atol=1e-5)
  gx, gw = jax.grad(lambda x, w: qdot.quant_dot_general(x, w, dims, spec).sum(), (0, 1))(x, w)
  np.testing.assert_allclose(gx, jnp.ones((5, 24)) @ _reference(w, "e4m3").T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, x_hat.T @ jnp.ones((5, 24)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ("e4m3", "mxfp4", "nvfp4"))
def test_gptq_on_a_float_grid_lands_on_it_and_beats_rtn(fmt):
  k, n = 128, 32
  x = jax.random.normal(jax.random.key(3), (512, k)) @ jax.random.normal(jax.random.key(4), (k, k))
  w = jax.random.normal(jax.random.key(5), (k, n))
  spec = jc.Quant(w_format=fmt, method="gptq")
  h = gptq_core.hessian(x)
  q, step = gptq_core.gptq(w, h, spec)[:2]
  s = step[:, None, :]  # the kernel-layout step: (K/g, N) per group, (1, N) per channel
  qb = q.reshape(step.shape[0], -1, n)
  on_grid = formats.round_to_float(qb / s, formats.element_format(fmt)) * s
  np.testing.assert_array_equal(on_grid, qb)  # q is a grid value times its step
  rtn = _reference(w, fmt, spec.group)
  err = lambda wq: float(jnp.trace((wq - w).T @ h @ (wq - w)))
  assert err(q) < 0.8 * err(rtn)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gptq_convert_save_restore_on_a_tiny_llama_with_float_formats(tmp_path, fmt):
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(6), (4, 32), 0, 256)
  forward = nnx.jit(lambda m: m(tokens))  # one program per model, not one per op
  logits = forward(model)
  recipe = jc.Recipe([jc.Rule(r".*_proj", quant=jc.Quant(w_format=fmt, method="gptq"))])
  ptq = jc.ptq(model, recipe, calib=tokens)
  out = forward(ptq)
  assert np.isfinite(np.asarray(out)).all()
  rel = float(jnp.linalg.norm(out - logits) / jnp.linalg.norm(logits))
  assert 0 < rel < 0.5, (fmt, rel)
  packed = jc.convert(ptq)
  np.testing.assert_array_equal(forward(packed), out)  # the stored codes: the same logits
  jc.save_packed(packed, tmp_path / fmt)
  like = nnx.eval_shape(lambda: jc.packed_skeleton(
      Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), recipe))
  np.testing.assert_array_equal(forward(jc.restore_packed(tmp_path / fmt, like)), out)


def test_qat_gradients_on_a_tiny_llama_with_fp8_weights_and_activations():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(6), (4, 32), 0, 256)
  qat = jc.quantize(model, jc.Recipe([jc.Rule(r".*_proj", quant=jc.Quant(
      w_format="e4m3", a_format="e4m3"))]))
  grads = nnx.jit(nnx.grad(lambda m: m(tokens).astype(jnp.float32).mean()))(qat)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("fmt", W_FORMATS)
@pytest.mark.parametrize("shape, contracting", [((64, 24), (0,)), ((4, 16, 12), (0, 1)),
                                                ((66, 8), (0,))])
def test_packed_float_formats_dequantize_to_the_fake_quant_kernel(fmt, shape, contracting):
  # each side jitted: one program per computation, not one per op and shape
  w = jax.random.normal(jax.random.key(7), shape) * 3
  spec = jc.Quant(w_format=fmt)
  qa = jax.jit(lambda w: jc.quant.quantize_weight(w, contracting, spec))(w)
  dequantize = jax.jit(lambda q: q.dequantize())
  np.testing.assert_array_equal(
      dequantize(qa), jax.jit(lambda w: qdot.fake_quant_weight(w, contracting, spec))(w))
  k = int(np.prod([shape[a] for a in contracting]))
  n = w.size // k
  assert qa.values.dtype == jnp.uint8
  value_bits = 8 * qa.values.size / w.size
  assert value_bits == {"e4m3": 8, "e5m2": 8}.get(fmt, 4 if k % 2 == 0 else 8)
  if fmt in ("mxfp4", "nvfp4"):
    assert qa.scale.dtype == jnp.uint8 and qa.scale.shape == (n, -(-k // spec.group))
  # a solved step (PTQ) packs to the same codes
  step = jax.jit(lambda w: jc.quant.qarray.initial_step(w, contracting, spec))(w)
  again = jax.jit(lambda w, step: jc.quant.qarray.quantize_with_step(
      w, contracting, step, spec.w_bits, spec.group, fmt=fmt))(w, step)
  np.testing.assert_array_equal(dequantize(again), dequantize(qa))
  # the packed dot (weight-only and with fp8 activations) equals the fake-quant dot
  x = jax.random.normal(jax.random.key(8), (3,) + tuple(shape[a] for a in contracting))
  dims = ((tuple(range(1, 1 + len(contracting))), contracting), ((), ()))
  for s in (spec, dataclasses.replace(spec, a_format="e4m3", a_bits=8)):
    dot = jax.jit(lambda x, w, s=s: qdot.quant_dot_general(x, w, dims, s))
    np.testing.assert_allclose(dot(x, qa), dot(x, w), rtol=1e-6, atol=1e-5)


def test_packed_float_formats_bits_per_weight():
  w = jax.random.normal(jax.random.key(9), (512, 64))
  pack = lambda f: jax.jit(lambda w: jc.quant.quantize_weight(w, (0,), jc.Quant(w_format=f)))(w)
  bits = {f: 8 * pack(f).nbytes / w.size for f in W_FORMATS}
  assert bits["mxfp4"] == 4.25 and bits["nvfp4"] == 4.5 + 32 / w.size
  assert bits["e4m3"] == bits["e5m2"] == 8 + 32 / 512


def test_fp8_w8a8_runs_an_fp8_dot_with_the_fake_quant_numbers_and_gradients():
  x = jax.random.normal(jax.random.key(10), (6, 64))
  w = jax.random.normal(jax.random.key(11), (64, 24))
  dims = (((1,), (0,)), ((), ()))
  spec = jc.Quant(w_format="e4m3", a_format="e4m3")
  assert spec.fp8_dot and not jc.Quant(w_format="e4m3", a_format="e5m2").fp8_dot
  f = lambda x, w: qdot.quant_dot_general(x, w, dims, spec)
  hlo = jax.jit(f).lower(x, w).as_text()
  assert "f8E4M3FN" in hlo and "dot_general" in hlo
  s = formats.format_scale(x, "e4m3", axes=1)
  x_hat = formats.round_to_float(x / s, "e4m3") * s
  w_hat = _reference(w, "e4m3")
  np.testing.assert_allclose(f(x, w), x_hat @ w_hat, rtol=2e-6, atol=2e-6)
  gx, gw = jax.grad(lambda x, w: f(x, w).sum(), (0, 1))(x, w)
  ste = lambda a, a_hat: a_hat + a - jax.lax.stop_gradient(a)  # the STE of the float product
  rx, rw = jax.grad(lambda x, w: (ste(x, x_hat) @ ste(w, w_hat)).sum(), (0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)
  qa = jc.quant.quantize_weight(w, (0,), spec)  # serving: the same fp8 dot on the stored bytes
  np.testing.assert_array_equal(qdot.quant_dot_general(x, qa, dims, spec), f(x, w))
