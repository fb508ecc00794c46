"""Hugging Face safetensors loader: a tiny HF-layout checkpoint loads back to the same logits."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from jaxcomp.models.io import hf_config
from jaxcomp.models.io import load_safetensors
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _tokens(vocab, shape=(2, 16)):
  return jax.random.randint(jax.random.key(2), shape, 0, vocab)


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
  """The model's weights under Hugging Face names, ``nn.Linear`` as ``(out, in)``."""
  w = lambda m: np.asarray(m.kernel[...]).T  # noqa: E731
  out = {"model.embed_tokens.weight": np.asarray(model.embed.embedding[...]),
         "model.norm.weight": np.asarray(model.norm.scale[...])}
  if not model.config.tie_embeddings:
    out["lm_head.weight"] = w(model.lm_head)
  for i, blk in enumerate(model.layers):
    p = f"model.layers.{i}."
    out |= {
        p + "input_layernorm.weight": np.asarray(blk.attn_norm.scale[...]),
        p + "post_attention_layernorm.weight": np.asarray(blk.mlp_norm.scale[...]),
        **{p + f"self_attn.{n}.weight": w(getattr(blk.attn, n))
           for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{p + f"mlp.{n}.weight": w(getattr(blk.mlp, n))
           for n in ("gate_proj", "up_proj", "down_proj")},
    }
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config_dict(cfg: LlamaConfig) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rope_scaling": None,
      "attention_bias": False, "mlp_bias": False, "head_dim": cfg.resolved_head_dim,
      "torch_dtype": "float32",
  }


def write_hf(folder, model, *, drop=(), replace=None, config=None):
  folder.mkdir(exist_ok=True)
  tensors = hf_tensors(model)
  for n in drop:
    del tensors[n]
  tensors |= replace or {}
  safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
  cfg = hf_config_dict(model.config) | (config or {})
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder


@pytest.fixture
def model():
  return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("tie", [False, True])
def test_logits_exact(tmp_path, tie):
  model = Llama(LlamaConfig.tiny(tie_embeddings=tie), rngs=nnx.Rngs(3))
  loaded = load_safetensors(write_hf(tmp_path / "ckpt", model))
  assert loaded.config == model.config
  tokens = _tokens(model.config.vocab_size)
  np.testing.assert_array_equal(_forward(loaded, tokens), _forward(model, tokens))


def test_tied_checkpoint_with_head_copy(tmp_path):
  model = Llama(LlamaConfig.tiny(tie_embeddings=True), rngs=nnx.Rngs(3))
  emb = np.asarray(model.embed.embedding[...])
  loaded = load_safetensors(write_hf(tmp_path / "c", model, replace={"lm_head.weight": emb}))
  assert not hasattr(loaded, "lm_head")


def test_sharded_bf16_checkpoint(tmp_path, model):
  """Shards listed by model.safetensors.index.json, stored in bfloat16."""
  folder = tmp_path / "sharded"
  folder.mkdir()
  tensors = {k: jnp.asarray(v, jnp.bfloat16) for k, v in hf_tensors(model).items()}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    safetensors.flax.save_file({k: tensors[k] for k in keys}, str(folder / file))
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
  loaded = load_safetensors(folder)
  got = np.asarray(loaded.layers[1].mlp.up_proj.kernel[...])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(
      got, np.asarray(tensors["model.layers.1.mlp.up_proj.weight"], np.float32).T)


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop=("model.layers.1.mlp.gate_proj.weight",)),
     "'model.layers.1.mlp.gate_proj.weight' is missing"),
    (dict(replace={"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\).*expected \(64, 32\)"),
    (dict(replace={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     "'model.layers.0.self_attn.q_proj.bias' is not used"),
    (dict(config={"model_type": "qwen2"}), "model_type='qwen2' is not supported"),
    (dict(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
     "rope_scaling=.* is not supported"),
    (dict(config={"attention_bias": True}), "attention_bias=true is not supported"),
])
def test_errors(tmp_path, model, kwargs, match):
  folder = write_hf(tmp_path / "bad", model, **kwargs)
  with pytest.raises(ValueError, match=match):
    load_safetensors(folder)


def test_config_head_dim():
  cfg = hf_config_dict(LlamaConfig.tiny())
  assert hf_config(cfg).head_dim is None  # 16 == dim // n_heads
  assert hf_config(cfg | {"head_dim": 32}).head_dim == 32


def test_missing_config_field():
  cfg = hf_config_dict(LlamaConfig.tiny())
  del cfg["hidden_size"]
  with pytest.raises(ValueError, match="'hidden_size' is missing"):
    hf_config(cfg)


def test_missing_weights_file(tmp_path, model):
  folder = write_hf(tmp_path / "c", model)
  (folder / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="no model.safetensors"):
    load_safetensors(folder)
