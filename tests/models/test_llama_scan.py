"""`LlamaConfig(scan_layers=True)`: the blocks stacked and run by `nnx.scan` (MaxText's default
for compile time on pods) give the unrolled model's logits, cache and hidden states, and the
transforms give the same results on both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, generate, scan_layers, unroll_layers

UNROLLED = r"layers/\d+/(attn|mlp)/\w+_proj"
SCANNED = r"layers/(attn|mlp)/\w+_proj"


@pytest.fixture(scope="module")
def pair():
  model = Llama(LlamaConfig.tiny(n_layers=3), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  return model, scan_layers(model), tokens


@nnx.jit
def _logits(model, tokens):
  """``model(tokens)`` as one program (eager runs compile one per op and shape)."""
  return model(tokens)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_logits_cache_and_hiddens_equal_the_unrolled_model(pair):
  model, scanned, tokens = pair
  assert scanned.config.scan_layers and scanned.layers.attn.q_proj.kernel.shape == (3, 64, 64)
  assert tuple(scanned.layers.mlp.up_proj.kernel.get_metadata()["out_sharding"]) == (
      "layers", "embed", "mlp")
  _close(scanned(tokens), model(tokens))
  (l1, h1, c1), (l2, h2, c2) = (m(tokens, cache=m.init_cache(2, 16), fresh_cache=True,
                                  return_hidden=True) for m in (model, scanned))
  _close(l2, l1)
  _close(c2.k, c1.k)
  assert len(h2) == 3
  for a, b in zip(h1, h2):
    _close(b, a)
  _close(scanned(tokens[:, :1], cache=c2)[0], model(tokens[:, :1], cache=c1)[0])
  np.testing.assert_array_equal(np.asarray(generate(scanned, tokens[:, :4], 3)),
                                np.asarray(generate(model, tokens[:, :4], 3)))
  _close(unroll_layers(scanned)(tokens), model(tokens), 1e-6)


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=4, group=32, method="gptq", options={"act_order": True}),
    jc.Quant(w_bits=8, a_bits=8, method="smoothquant"),
], ids=["gptq", "smoothquant"])
def test_ptq_and_convert_equal_the_unrolled_model(pair, spec):
  model, scanned, tokens = pair
  calib = jax.random.randint(jax.random.key(2), (8, 16), 0, 256)
  kw = dict(progress=False, calib_dtype=None, strict=True)
  q = jc.ptq(scanned, jc.Recipe([jc.Rule(SCANNED, quant=spec)]), calib, **kw)
  ref = jc.ptq(model, jc.Recipe([jc.Rule(UNROLLED, quant=spec)]), calib, **kw)
  tol = 1e-2 if spec.a_bits else 1e-4  # per-token int8 rounding turns last-ulp diffs into steps
  _close(_logits(q, tokens), _logits(ref, tokens), tol)
  packed = jc.convert(q)
  _close(_logits(packed, tokens), _logits(q, tokens), tol)


def test_pruning_and_qat_equal_the_unrolled_model(pair):
  model, scanned, tokens = pair
  calib = jax.random.randint(jax.random.key(2), (8, 16), 0, 256)
  sparse = jc.Sparsity("2:4", method="sparsegpt")
  kw = dict(progress=False, calib_dtype=None, strict=True)
  p = jc.prune(scanned, jc.Recipe([jc.Rule(SCANNED, sparsity=sparse)]), calib, **kw)
  ref = jc.prune(model, jc.Recipe([jc.Rule(UNROLLED, sparsity=sparse)]), calib, **kw)
  _close(_logits(p, tokens), _logits(ref, tokens), 1e-4)
  lsq = jc.Quant(w_bits=4, group=32, learn_scale=True)
  q = jc.quantize(scanned, jc.Recipe([jc.Rule(SCANNED, quant=lsq)]), strict=True)
  qref = jc.quantize(model, jc.Recipe([jc.Rule(UNROLLED, quant=lsq)]), strict=True)
  _close(_logits(q, tokens), _logits(qref, tokens))
  assert q.layers.attn.q_proj.dot_general.w_step.shape == (3, 2, 64)
