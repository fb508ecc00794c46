"""The quantized dot's dispatch: forced onto the TPU / GPU kernels (interpreted on this host),
a packed Llama gives the XLA path's logits; QAT's int8 dots (forward and backward) run through
the int8 kernel with the same gradients; unsupported packed layers fail with one line. The
backend is an argument (`jc.quantize` / `jc.convert` / `block_sparse_matmul`), resolved once;
the environment variable is only its default."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.quant.dot import kernel_backend

CFG = LlamaConfig.tiny(tie_embeddings=True)
TOKENS = jax.random.randint(jax.random.key(1), (1, 8), 0, 256)


def _packed(spec, backend="xla"):
  model = Llama(CFG, rngs=nnx.Rngs(0))
  return jc.convert(jc.quantize(model, jc.Recipe([jc.Rule(r".*_proj", quant=spec)])),
                    backend=backend)


def _logits_and_jaxpr(model, tokens):
  graphdef, state = nnx.split(model)
  fn = lambda s, t: nnx.merge(graphdef, s)(t)
  return jax.jit(fn)(state, tokens), str(jax.make_jaxpr(fn)(state, tokens))


_XLA_LOGITS = {}


def _xla_logits(key, spec):
  """The XLA path's logits of ``spec``'s packed model, once per spec (both backends use them)."""
  if key not in _XLA_LOGITS:
    logits, jaxpr = _logits_and_jaxpr(_packed(spec, "xla"), TOKENS)
    assert "pallas_call" not in jaxpr
    _XLA_LOGITS[key] = logits
  return _XLA_LOGITS[key]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("spec", [jc.Quant(w_bits=8, a_bits=8), jc.Quant(w_bits=4, group=32),
                                  jc.Quant(w_bits=4),
                                  jc.Quant(w_bits=4, group=32, w_symmetric=False),
                                  jc.Quant(w_bits=3, group=32), jc.Quant(w_bits=2, group=32)],
                         ids=str)
def test_packed_llama_through_the_kernels_matches_xla(backend, spec):
  ref = _xla_logits(str(spec), spec)
  out, jaxpr = _logits_and_jaxpr(_packed(spec, backend), TOKENS)
  assert jaxpr.count("pallas_call") == 7 * CFG.n_layers  # every projection, no other dot
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_qat_int8_dots_forward_and_backward_through_the_kernel():
  recipe = jc.Recipe([jc.Rule(r"layers/\d+/mlp/\w+_proj", quant=jc.Quant(
      w_bits=8, a_bits=8, a_symmetric=True, g_bits=8))])

  def loss_fn(backend):
    model = jc.quantize(Llama(CFG, rngs=nnx.Rngs(0)), recipe, backend=backend)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(TOKENS) ** 2)), params

  loss, params = loss_fn("xla")
  assert "pallas_call" not in str(jax.make_jaxpr(jax.grad(loss))(params))
  ref_loss, ref_grads = jax.value_and_grad(loss)(params)
  loss, params = loss_fn("gpu")
  assert "pallas_call" in str(jax.make_jaxpr(jax.grad(loss))(params))
  k_loss, k_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(float(k_loss), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(k_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_forced_kernel_on_an_unsupported_group_is_one_line():
  model = _packed(jc.Quant(w_bits=4, group=16), "tpu")
  with pytest.raises(ValueError, match=r"int4 kernel \(tpu\): the packed kernel .* groups of "
                     r"16 over K=64"):
    model(TOKENS)


@pytest.mark.parametrize("backend,block", [("tpu", (128, 128)), ("gpu", (32, 64))])
def test_block_sparse_storage_runs_the_kernel_when_dispatched(backend, block):
  w = jax.random.normal(jax.random.key(0), (384, 256))
  keep = jc.sparse.block_mask(jnp.abs(w), 0.5, block)
  bs = jc.sparse.BlockSparse.from_dense(w, keep, block)
  x = jax.random.normal(jax.random.key(1), (2, 5, 384))
  ref = jc.sparse.block_sparse_matmul(x, bs, backend="xla")
  mm = functools.partial(jc.sparse.block_sparse_matmul, backend=backend)
  assert "pallas_call" in str(jax.make_jaxpr(mm)(x, bs))
  out = mm(x, bs)
  assert out.shape == (2, 5, 256)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(x @ (w * keep)), rtol=1e-5, atol=1e-4)


def test_block_sparse_blocks_the_tpu_kernel_cannot_take_are_one_line():
  w = jnp.ones((64, 64))
  bs = jc.sparse.BlockSparse.from_dense(w, jnp.ones((64, 64), bool), (16, 16))
  with pytest.raises(ValueError, match=r"blocks \(16, 16\) are not supported .*"
                     r"JAXCOMP_KERNEL_BACKEND=xla"):
    jc.sparse.block_sparse_matmul(jnp.ones((1, 64)), bs, backend="tpu")


def test_the_environment_variable_is_only_the_default(monkeypatch):
  monkeypatch.setenv("JAXCOMP_KERNEL_BACKEND", "gpu")
  assert kernel_backend() == "gpu" and kernel_backend("xla") == "xla"
  model = _packed(jc.Quant(w_bits=8, a_bits=8), None)  # resolved from the variable, once
  monkeypatch.setenv("JAXCOMP_KERNEL_BACKEND", "xla")
  _, jaxpr = _logits_and_jaxpr(model, TOKENS)  # a later change of the variable does not matter
  assert "pallas_call" in jaxpr
  _, jaxpr = _logits_and_jaxpr(jc.convert(model, backend="xla"), TOKENS)
  assert "pallas_call" not in jaxpr
