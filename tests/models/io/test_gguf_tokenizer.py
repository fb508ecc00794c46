"""Tokenizer from GGUF metadata: byte-level BPE on a tiny vocabulary written by the test."""

import gguf
import pytest

from jaxcomp.models.io import gguf_tokenizer
from jaxcomp.models.io import special_token_ids

TEXTS = [
    "the the hello world",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "digits 2024 and 3.14159",
    "unicode: é ß 日本語 🙂 — «quotes»",
    " = Robert <unk> = \n Robert <unk> is an English film @-@ actor .",
]


@pytest.fixture
def tok(tiny_gguf):
  return gguf_tokenizer(tiny_gguf())


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
  ids = tok.encode(text).ids
  assert all(0 <= i < tok.get_vocab_size() for i in ids)
  assert tok.decode(ids) == text


def test_merges_apply(tok):
  ids = tok.encode("the the").ids
  assert [tok.id_to_token(i) for i in ids] == ["t", "he", "Ġthe"]
  assert tok.encode("hello").tokens == ["he", "ll", "o"]


def test_smollm_splits_digits(tiny_gguf):
  """llama.cpp's "smollm" pre-tokenizer splits digits one by one; "gpt2" does not."""
  smollm = gguf_tokenizer(tiny_gguf(pre="smollm"))
  gpt2 = gguf_tokenizer(tiny_gguf(pre="gpt2", name="gpt2.gguf"))
  assert smollm.encode("2024").tokens == ["2", "0", "2", "4"]
  assert gpt2.encode("2024").tokens == ["20", "2", "4"]


def test_special_tokens(tok, tiny_gguf):
  ids = tok.encode("<|im_start|>the<|im_end|>").ids
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids) == "the"
  assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>the<|im_end|>"
  assert tok.encode("hi").ids[0] != 1  # no BOS added
  assert special_token_ids(tiny_gguf()) == {"bos": 1, "eos": 2, "unk": None, "pad": None}


def test_ids_match_gguf_token_list(tok, tiny_gguf):
  tokens = gguf.GGUFReader(tiny_gguf()).fields["tokenizer.ggml.tokens"].contents()
  assert tok.get_vocab_size() == len(tokens)
  assert all(tok.token_to_id(t) == i for i, t in enumerate(tokens))


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokenizer_model="llama"), "tokenizer.ggml.model='llama' is not supported"),
    (dict(pre="qwen2"), "tokenizer.ggml.pre='qwen2' is not supported"),
])
def test_errors(tiny_gguf, kwargs, match):
  with pytest.raises(ValueError, match=match):
    gguf_tokenizer(tiny_gguf(**kwargs))
