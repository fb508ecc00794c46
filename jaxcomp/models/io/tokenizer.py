"""Builds a Hugging Face ``tokenizers.Tokenizer`` from a GGUF file's vocabulary.

Supports ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (GPT-2 style), as
SmolLM2, Llama 3 and Qwen use. Read from the metadata:

* ``tokenizer.ggml.tokens`` -- the vocabulary, token ``i`` has id ``i``;
* ``tokenizer.ggml.merges`` -- BPE merges, ``"Ġ t"`` (two parts, one space);
* ``tokenizer.ggml.token_type`` -- ``3`` (control) tokens become special
  added tokens (``<|im_start|>`` encodes as one id and is skipped by
  ``decode``), ``4`` (user defined) become plain added tokens;
* ``tokenizer.ggml.pre`` -- llama.cpp's pre-tokenizer name, mapped to the
  equivalent ``tokenizers`` pre-tokenizer (``"smollm"``: single digits, then
  the GPT-2 regex);
* ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id`` -- via
  :func:`special_token_ids`.

No BOS/EOS is added by ``encode`` (SmolLM2 sets ``add_bos_token = False``).

Example::

  tok = gguf_tokenizer(fetch_smollm2())
  ids = tok.encode("Hello world").ids          # [19556, 905]
  tok.decode(ids)                              # "Hello world"
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from jaxcomp.models.io.gguf import gguf_field
from jaxcomp.models.io.gguf import open_gguf

_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# llama.cpp `tokenizer.ggml.pre` values whose splitting `tokenizers` reproduces:
# True -> split digits one by one before the GPT-2 regex (llama.cpp's "\p{N}" rule).
_PRE_TOKENIZERS = {
    "default": False,
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
    "codeshell": True,
}


def _reader(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> gguf.GGUFReader:
  return open_gguf(path_or_reader)  # one-line errors for truncated / corrupt files


def gguf_tokenizer(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer stored in a GGUF file's metadata.

  Args:
    path_or_reader: a ``.gguf`` path or an open ``gguf.GGUFReader``.

  Returns:
    A ``tokenizers.Tokenizer``; ``encode(text).ids`` are the model's token ids
    and ``decode(ids)`` inverts it for any text.

  Raises:
    ValueError: a missing ``tokenizer.ggml.*`` field, a tokenizer model other
      than ``"gpt2"``, an unknown ``tokenizer.ggml.pre``, or a malformed merge.

  Example::

    tok = gguf_tokenizer("model.gguf")
    tok.encode("Hello world").ids
  """
  r = _reader(path_or_reader)
  kind = gguf_field(r, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (only 'gpt2')")
  pre = gguf_field(r, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported "
                     f"(supported: {sorted(_PRE_TOKENIZERS)})")
  tokens = list(gguf_field(r, "tokenizer.ggml.tokens"))
  merges = []
  for i, merge in enumerate(gguf_field(r, "tokenizer.ggml.merges")):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"GGUF tokenizer.ggml.merges[{i}]={merge!r} is not two tokens")
    merges.append((parts[0], parts[1]))
  types = list(gguf_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
  if len(types) != len(tokens):
    raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries, "
                     f"tokenizer.ggml.tokens has {len(tokens)}")

  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _PRE_TOKENIZERS[pre]:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if int(ty) == _CONTROL]
  user = [tokenizers.AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types) if int(ty) == _USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(user)
  return tok


def special_token_ids(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> dict[str, Any]:
  """``{"bos": id, "eos": id, "unk": id, "pad": id}`` from the GGUF metadata (None if unset).

  Example::

    special_token_ids("model.gguf")            # {'bos': 1, 'eos': 2, 'unk': 0, 'pad': 2}
  """
  r = _reader(path_or_reader)
  keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
          "pad": "padding_token_id"}
  out = {}
  for name, key in keys.items():
    value = gguf_field(r, f"tokenizer.ggml.{key}", None)
    out[name] = None if value is None else int(value)
  return out


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocabulary 256): the tokenizer of the ``tiny`` test model."""

  class _Encoding:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text: str) -> "ByteTokenizer._Encoding":
    return self._Encoding(list(text.encode("utf-8")))

  def to_str(self) -> str:
    """Its whole definition (what `jaxcomp.data.text.tokenizer_digest` hashes)."""
    return "jaxcomp.ByteTokenizer/utf-8"

  def token_to_id(self, token: str) -> int | None:
    del token
    return None  # no special tokens
