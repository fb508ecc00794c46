"""QuaRot rotations folded into a Llama (models/llama_surgery.rotate_llama) and the Hadamard
numerics (quant/hadamard.py): the same logits; activation outliers spread; W4A4 error cut."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers
from jaxcomp.models.llama_surgery import rotate_llama
from jaxcomp.quant import hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 96, 576, 1536])
def test_hadamard_orders_and_the_fast_transform(n):
  h = hadamard.hadamard_matrix(n)
  assert set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
  x = jax.random.normal(jax.random.key(0), (3, n))
  np.testing.assert_allclose(hadamard.fwht(x), x @ h / np.sqrt(n), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hadamard.fwht_transpose(hadamard.fwht(x)), x, rtol=1e-5, atol=1e-5)


def test_unsupported_order_is_one_line():
  with pytest.raises(ValueError, match="hadamard: no construction for order 6"):
    hadamard.hadamard_matrix(6)


def _model(tie=True, scan=False):
  cfg = LlamaConfig.tiny()
  cfg = dataclasses.replace(cfg, tie_embeddings=tie)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  # norm scales away from 1, so that folding them matters
  for i, layer in enumerate(model.layers):
    for norm in (layer.attn_norm, layer.mlp_norm):
      norm.scale[...] = 1 + 0.5 * jax.random.normal(jax.random.key(10 + i), norm.scale.shape)
  model.norm.scale[...] = 1 + 0.5 * jax.random.normal(jax.random.key(3), model.norm.scale.shape)
  return scan_layers(model) if scan else model


@pytest.mark.parametrize("tie, online, heads, scan", [(True, True, True, False),
                                                      (False, False, False, False),
                                                      (True, True, False, True)])
def test_rotation_keeps_the_logits(tie, online, heads, scan):
  model = _model(tie, scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
  before = jax.tree.map(np.asarray, nnx.state(model))
  rotated = rotate_llama(model, jax.random.key(2), online=online, heads=heads)
  ref, got = model(tokens), rotated(tokens)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  assert rotated.config.ffn_hadamard == online and not rotated.config.tie_embeddings
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))


def test_rotation_spreads_an_outlier_channel_and_cuts_w4a4_error():
  model = _model()
  # An outlier channel in the residual stream, as trained LLMs have (a few huge features).
  model.embed.embedding[...] = model.embed.embedding[...].at[:, 5].multiply(60.0)
  tokens = jax.random.randint(jax.random.key(4), (4, 32), 0, 256)
  rotated = rotate_llama(model, jax.random.key(5))
  w4a4 = jc.Recipe([jc.Rule(r".*_proj", quant=jc.Quant(w_bits=4, a_bits=4, group=None))])
  ref = model(tokens)
  err = lambda m: float(jnp.mean(jnp.square(jc.quantize(m, w4a4)(tokens) - ref)))
  assert err(rotated) < 0.5 * err(model)
  kurtosis = lambda x: float(jnp.mean(x ** 4) / jnp.mean(x ** 2) ** 2)
  h_plain = model.embed(tokens)
  h_rot = rotated.embed(tokens)
  assert kurtosis(h_rot) < 0.2 * kurtosis(h_plain)
