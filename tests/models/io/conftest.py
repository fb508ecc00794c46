"""Fixtures: a tiny Llama and a writer of llama.cpp-layout GGUF files for it.

``write_gguf(model, path, ...)`` stores ``model`` the way llama.cpp's
``convert_hf_to_gguf.py`` would: numpy ``(out, in)`` matrices (ggml
``[in, out]``), q/k rows permuted to the interleaved RoPE layout, metadata
under ``llama.*`` and a tiny byte-level BPE vocabulary (:data:`TINY_TOKENS`).
"""

from collections.abc import Callable

from flax import nnx
import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig
from jaxcomp.models.llama import permute_rope_kernel

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "o r", "2 0"]
TINY_TOKENS = (SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet())
               + ["".join(m.split(" ")) for m in MERGES])
TINY_TYPES = [int(gguf.TokenType.CONTROL)] * len(SPECIAL) + [int(gguf.TokenType.NORMAL)] * (
    len(TINY_TOKENS) - len(SPECIAL))


def tiny_config(**overrides) -> LlamaConfig:
  """tiny Llama whose vocabulary is the tiny tokenizer's (3 special + 256 bytes + 6 merges)."""
  return LlamaConfig.tiny(vocab_size=len(TINY_TOKENS), **overrides)


def gguf_tensors(model: Llama) -> dict[str, np.ndarray]:
  """``{llama.cpp name: numpy array}`` of a ``rope_style="half"`` model."""
  cfg = model.config
  k = lambda m: np.asarray(m.kernel[...])  # noqa: E731  [in, out]
  out = {"token_embd.weight": np.asarray(model.embed.embedding[...]),
         "output_norm.weight": np.asarray(model.norm.scale[...])}
  if not cfg.tie_embeddings:
    out["output.weight"] = k(model.lm_head).T
  for i, blk in enumerate(model.layers):
    a, m = blk.attn, blk.mlp
    out |= {
        f"blk.{i}.attn_norm.weight": np.asarray(blk.attn_norm.scale[...]),
        f"blk.{i}.attn_q.weight": permute_rope_kernel(k(a.q_proj), cfg.n_heads,
                                                      to="interleaved").T,
        f"blk.{i}.attn_k.weight": permute_rope_kernel(k(a.k_proj), cfg.n_kv_heads,
                                                      to="interleaved").T,
        f"blk.{i}.attn_v.weight": k(a.v_proj).T,
        f"blk.{i}.attn_output.weight": k(a.o_proj).T,
        f"blk.{i}.ffn_norm.weight": np.asarray(blk.mlp_norm.scale[...]),
        f"blk.{i}.ffn_gate.weight": k(m.gate_proj).T,
        f"blk.{i}.ffn_up.weight": k(m.up_proj).T,
        f"blk.{i}.ffn_down.weight": k(m.down_proj).T,
    }
  return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def write_gguf(path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], *,
               arch: str = "llama", skip_fields: tuple[str, ...] = (),
               quant: dict[str, gguf.GGMLQuantizationType] | None = None,
               tokenizer_model: str = "gpt2", pre: str = "smollm") -> None:
  """Writes ``tensors`` (numpy layout) and ``cfg`` as GGUF metadata to ``path``.

  ``quant`` maps tensor names to a ggml type to store them in (e.g. Q8_0).
  """
  w = gguf.GGUFWriter(str(path), arch)
  fields = {
      "block_count": cfg.n_layers, "context_length": cfg.max_seq_len,
      "embedding_length": cfg.dim, "feed_forward_length": cfg.ffn_dim,
      "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads,
      "rope.freq_base": float(cfg.rope_theta),
      "attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
      "rope.dimension_count": cfg.resolved_head_dim, "vocab_size": cfg.vocab_size,
  }
  for key, value in fields.items():
    if key in skip_fields:
      continue
    if isinstance(value, float):
      w.add_float32(f"{arch}.{key}", value)
    else:
      w.add_uint32(f"{arch}.{key}", value)
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(TINY_TOKENS)
  w.add_token_types(TINY_TYPES)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, x in tensors.items():
    qtype = (quant or {}).get(name)
    if qtype is None:
      w.add_tensor(name, x)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture
def make_tiny_model() -> Callable[..., Llama]:
  """``make(**LlamaConfig overrides)`` -> tiny Llama over the tiny vocabulary."""
  return lambda **overrides: Llama(tiny_config(**overrides), rngs=nnx.Rngs(0))


@pytest.fixture
def tiny_model(make_tiny_model) -> Llama:
  return make_tiny_model()  # untied: has lm_head.


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model) -> Callable[..., str]:
  """``make(model=tiny_model, drop=(), replace={}, **write_gguf kwargs)`` -> GGUF path."""
  def make(*, model=None, drop=(), replace=None, name="tiny.gguf", **kwargs) -> str:
    model = model or tiny_model
    tensors = gguf_tensors(model)
    for n in drop:
      del tensors[n]
    tensors |= replace or {}
    path = tmp_path / name
    write_gguf(path, model.config, tensors, **kwargs)
    return str(path)
  return make
