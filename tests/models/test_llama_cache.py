"""Tests for KV-cache decoding in jaxcomp.models.llama: cache == full forward, generate.

Every jitted call uses batch 2, a 16-slot cache and length-12 full forwards, so
the tests share a handful of compilations.
"""

import dataclasses

import jax

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models import llama as llama_lib
from jaxcomp.models import sample_tokens
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig

B, S_MAX, T = 2, 16, 12


@nnx.jit
def _forward(model, tokens):
  return model(tokens, return_hidden=True)


@nnx.jit
def _cached(model, tokens, cache):
  """Cached forward under jit: `cache.index` is traced."""
  return model(tokens, cache=cache, return_hidden=True)


def _tokens(shape=(B, T), seed=1, vocab=256):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# Both RoPE layouts; tiny() is GQA (4 query heads, 2 key/value heads).
_CONFIGS = {"half": dict(rope_style="half"),
            "interleaved": dict(rope_style="interleaved", tie_embeddings=True)}


def _model(style="half", **overrides):
  model = Llama(LlamaConfig.tiny(**_CONFIGS[style], **overrides), rngs=nnx.Rngs(0))
  # Non-trivial norm scales, so every parameter matters.
  norms = [n for _, n in nnx.iter_graph(model) if isinstance(n, llama_lib.RMSNorm)]
  rng = np.random.default_rng(7)
  for norm in norms:
    norm.scale[...] = jnp.asarray(1.0 + 0.5 * rng.standard_normal(norm.scale.shape),
                                  jnp.float32)
  return model


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_prefill_then_decode_equals_full_forward(style):
  model = _model(style)
  tokens = _tokens()
  want, want_h = _forward(model, tokens)
  cache = model.init_cache(B, S_MAX)
  assert cache.k.shape == cache.v.shape == (2, B, 2, S_MAX, 16)
  assert cache.k.dtype == jnp.float32 and cache.index.dtype == jnp.int32
  p = 7
  logits, hiddens, cache = _cached(model, tokens[:, :p], cache)
  np.testing.assert_allclose(logits, want[:, :p], atol=1e-5)
  for h, w in zip(hiddens, want_h, strict=True):
    np.testing.assert_allclose(h, w[:, :p], atol=1e-5)
  for t in range(p, T):
    logits, hiddens, cache = _cached(model, tokens[:, t:t + 1], cache)
    assert logits.shape == (B, 1, 256)
    np.testing.assert_allclose(logits[:, 0], want[:, t], atol=1e-5)
    np.testing.assert_allclose(hiddens[-1][:, 0], want_h[-1][:, t], atol=1e-5)
  assert int(cache.index) == T


def test_prefill_in_two_chunks_equals_one():
  model = _model()
  tokens = _tokens(seed=3)
  one, _, cache1 = _cached(model, tokens, model.init_cache(B, S_MAX))
  a, _, cache2 = _cached(model, tokens[:, :7], model.init_cache(B, S_MAX))
  b, _, cache2 = _cached(model, tokens[:, 7:], cache2)
  np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), one, atol=1e-5)
  np.testing.assert_allclose(cache2.k, cache1.k, atol=1e-6)
  np.testing.assert_allclose(cache2.v, cache1.v, atol=1e-6)
  assert int(cache2.index) == int(cache1.index) == T


def test_generate_equals_argmax_of_full_forward():
  model = _model("interleaved")  # RoPE layouts are both covered above
  prompt = _tokens((B, 5), seed=4)
  got = llama_lib.generate(model, prompt, max_new_tokens=T - 5, max_len=S_MAX)
  assert got.shape == (B, T) and got.dtype == jnp.int32
  # Reference: recompute the full forward for every new token. Causality lets
  # one length-T buffer serve every step (later slots don't affect position i).
  want = jnp.zeros((B, T), jnp.int32).at[:, :5].set(prompt)
  for i in range(5, T):
    logits, _ = _forward(model, want)
    want = want.at[:, i].set(jnp.argmax(logits[:, i - 1], axis=-1).astype(jnp.int32))
  np.testing.assert_array_equal(got, want)

  # The exposed steps (same shapes as generate's, so no new compilation).
  prefill_fn, decode_fn = llama_lib.make_decode_fns(model)
  last, cache = prefill_fn(prompt, model.init_cache(B, S_MAX))
  np.testing.assert_allclose(last, logits[:, 4], atol=1e-5)
  last, cache = decode_fn(want[:, 5], cache)
  np.testing.assert_allclose(last, logits[:, 5], atol=1e-5)
  assert int(cache.index) == 6


def test_max_len_and_overflow_raise():
  model = _model(max_seq_len=32)
  assert model.init_cache(1, 32).k.shape[3] == 32 == model.init_cache(1, 32).max_len
  with pytest.raises(ValueError, match="max_seq_len"):
    model.init_cache(1, 33)
  with pytest.raises(ValueError, match="max_seq_len"):
    llama_lib.generate(model, jnp.zeros((1, 30), jnp.int32), max_new_tokens=3)
  cache = dataclasses.replace(model.init_cache(B, 8), index=jnp.int32(6))
  with pytest.raises(ValueError, match="exceeds max_len"):
    model(jnp.zeros((B, 3), jnp.int32), cache=cache)  # 6 + 3 > 8, checked before any compute
  with pytest.raises(ValueError, match="must be"):
    model(jnp.zeros((B + 1, 1), jnp.int32), cache=cache)  # batch mismatch


def test_attention_batch_chunks_give_identical_logits():
  tokens = jax.random.randint(jax.random.key(5), (4, 12), 0, 256)
  ref = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  for chunk in (1, 2, 3):  # 3 does not divide the batch: the whole batch at once
    model = Llama(LlamaConfig.tiny(attn_batch_chunk=chunk), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t, m=model: m(t))(tokens)),
                                  np.asarray(jax.jit(lambda t: ref(t))(tokens)))
  with pytest.raises(ValueError, match="attn_batch_chunk must be a positive int"):
    LlamaConfig.tiny(attn_batch_chunk=0)


def test_causal_query_blocks_match_one_block():
  """Query blocks that skip the masked upper triangle give the T x T block's logits."""
  tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 256)
  ref = Llama(LlamaConfig.tiny(attn_query_chunk=None), rngs=nnx.Rngs(0))
  want = np.asarray(jax.jit(lambda t: ref(t))(tokens))
  for size in (1, 5, 12, 64):  # 5: a shorter last block; 12, 64: a single block
    model = Llama(LlamaConfig.tiny(attn_query_chunk=size), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t, m=model: m(t))(tokens)), want,
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="attn_query_chunk must be a positive int"):
    LlamaConfig.tiny(attn_query_chunk=-1)


def test_fresh_cache_prefill_equals_slot_prefill():
  model = _model(attn_query_chunk=5)
  prompt = _tokens((B, 7), seed=3)
  cache = model.init_cache(B, S_MAX)
  want_logits, want_cache = model(prompt, cache=cache)
  got_logits, got_cache = model(prompt, cache=cache, fresh_cache=True)
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
  # Layer 0's keys/values are bit-identical; later layers see float-rounding-close inputs.
  np.testing.assert_array_equal(got_cache.k[0], want_cache.k[0])
  np.testing.assert_allclose(got_cache.k, want_cache.k, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_cache.v, want_cache.v, rtol=1e-6, atol=1e-6)
  assert int(got_cache.index) == 7
  with pytest.raises(ValueError, match="fresh_cache=True needs a cache with index 0"):
    model(prompt[:, :1], cache=got_cache, fresh_cache=True)
  with pytest.raises(ValueError, match="fresh_cache=True needs a cache"):
    model(prompt, fresh_cache=True)


def test_sample_tokens_greedy_nucleus_and_determinism():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1], [0.05, 0.15, 0.8]]))
  np.testing.assert_array_equal(sample_tokens(logits, None), [0, 2])
  key = jax.random.key(0)
  # top_p 0.5: only the most likely token of each row is left
  many = jnp.stack([sample_tokens(logits, k, temperature=1.0, top_p=0.5)
                    for k in jax.random.split(key, 50)])
  assert (many == jnp.array([0, 2])).all()
  # top_p 0.85 keeps {0, 1} in row 0 and {2, 1} in row 1, never the tail
  many = jnp.stack([sample_tokens(logits, k, temperature=1.0, top_p=0.85)
                    for k in jax.random.split(key, 200)])
  assert set(np.unique(many[:, 0]).tolist()) == {0, 1} and set(np.unique(many[:, 1]).tolist()) == {1, 2}
  np.testing.assert_array_equal(sample_tokens(logits, key, temperature=1.0),
                                sample_tokens(logits, key, temperature=1.0))
