"""Perplexity: equals a hand computation (exp of mean NLL) for both window modes."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.eval.perplexity import perplexity
from jaxcomp.eval.perplexity import wikitext2
from jaxcomp.eval.perplexity import window_spans
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig

V = 11


class Bigram(nnx.Module):
  """logits[b, t] = table[tokens[b, t]]: the next token depends on the current one only."""

  def __init__(self, table: np.ndarray):
    self.table = nnx.Param(jnp.asarray(table))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.table[...][tokens]


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def ids():
  return np.random.default_rng(0).integers(0, V, 103)


@pytest.fixture
def bigram():
  return Bigram(np.random.default_rng(1).normal(size=(V, V)).astype(np.float32))


@pytest.mark.parametrize("stride", [None, 4, 7, 16])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_bigram_closed_form(bigram, ids, stride, batch_size):
  """Bigram NLL is context-free, so only *which* tokens are scored matters."""
  seq_len = 16
  logp = _log_softmax(np.asarray(bigram.table[...]))
  nll = -logp[ids[:-1], ids[1:]]  # nll[t - 1] scores token t
  if stride in (None, seq_len):
    scored = [t for t in range(1, len(ids)) if t % seq_len]  # window starts unscored
  else:
    scored = list(range(1, len(ids)))  # every token but the first, once
  expected = np.mean([nll[t - 1] for t in scored])
  got = perplexity(bigram, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
  assert got["tokens"] == len(scored)
  np.testing.assert_allclose(got["nll"], expected, rtol=1e-6)
  np.testing.assert_allclose(got["ppl"], np.exp(expected), rtol=1e-6)


def _hf_reference(model, ids, seq_len, stride):
  """Hugging Face's strided-perplexity loop, one window at a time, float64 log-softmax."""
  stride = stride or seq_len
  total, count, prev_end = 0.0, 0, 0
  for begin in range(0, len(ids), stride):
    end = min(begin + seq_len, len(ids))
    trg_len = end - prev_end
    window = ids[begin:end]
    logp = _log_softmax(model(jnp.asarray(window)[None])[0])
    for j in range(max(len(window) - trg_len, 1), len(window)):
      total -= logp[j - 1, window[j]]
      count += 1
    prev_end = end
    if end == len(ids):
      break
  return total / count, count


@pytest.mark.parametrize("stride", [None, 5, 12])
def test_llama_matches_window_by_window_reference(stride):
  model = Llama(LlamaConfig.tiny(vocab_size=V), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(2).integers(0, V, 61)
  expected, count = _hf_reference(model, ids, 12, stride)
  got = perplexity(model, ids, seq_len=12, stride=stride, batch_size=2)
  assert got["tokens"] == count
  np.testing.assert_allclose(got["nll"], expected, rtol=1e-5)


def test_stride_equal_seq_len_is_non_overlapping(bigram, ids):
  a = perplexity(bigram, ids, seq_len=16)
  b = perplexity(bigram, ids, seq_len=16, stride=16)
  assert a == b


def test_window_spans_doc_examples():
  assert window_spans(10, 4) == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
  assert window_spans(10, 4, stride=2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
  assert window_spans(9, 4) == [(0, 4, 1), (4, 8, 1)]  # a lone last token scores nothing


def test_compiles_once(bigram, ids):
  perplexity(bigram, ids, seq_len=16, batch_size=4)
  size = ppl_lib._window_nll._cache_size()
  perplexity(bigram, ids[:90], seq_len=16, batch_size=4)
  perplexity(bigram, ids, seq_len=16, stride=8, batch_size=4)
  assert ppl_lib._window_nll._cache_size() == size


def test_bfloat16_model_scored_in_f32(ids):
  model = Llama(LlamaConfig.tiny(vocab_size=V, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  got = perplexity(model, ids, seq_len=16)
  assert np.isfinite(got["ppl"]) and 1 < got["ppl"] < 2 * V


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=16, stride=17), "stride must be in"),
    (dict(seq_len=16, stride=0), "stride must be in"),
    (dict(seq_len=1), "seq_len must be >= 2"),
    (dict(seq_len=16, batch_size=0), "batch_size"),
])
def test_errors(bigram, ids, kwargs, match):
  with pytest.raises(ValueError, match=match):
    perplexity(bigram, ids, **kwargs)


def test_model_errors(bigram):
  model = Llama(LlamaConfig.tiny(vocab_size=V, max_seq_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=8"):
    perplexity(model, np.zeros(20, int), seq_len=16)
  with pytest.raises(ValueError, match="at least 2 tokens"):
    perplexity(bigram, np.zeros(1, int), seq_len=16)
  with pytest.raises(ValueError, match="1-D"):
    perplexity(bigram, np.zeros((2, 8), int), seq_len=4)


def test_wikitext2_reader(tmp_path):
  (tmp_path / "test.txt").write_text(" = Title = \n Some <unk> text @-@ here .\n")
  assert wikitext2("test", root=tmp_path).startswith(" = Title = \n")
  with pytest.raises(ValueError, match="'valid' not found"):
    wikitext2("valid", root=tmp_path)
  with pytest.raises(ValueError, match="split must be"):
    wikitext2("train", root=tmp_path)
