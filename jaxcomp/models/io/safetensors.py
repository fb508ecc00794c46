"""Loads Hugging Face Llama-family checkpoints (``config.json`` + safetensors).

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or
shards listed by ``model.safetensors.index.json``. Hugging Face stores
``nn.Linear`` weights as ``(out, in)``; our kernels are ``(in, out)``. Its q/k
projections use the ``rotate_half`` RoPE layout, so the model is built with
``rope_style="half"`` and no permutation:

==============================================  =================================
Hugging Face tensor                             our parameter
==============================================  =================================
``model.embed_tokens.weight``     ``(V, D)``    ``embed/embedding``
``model.layers.{i}.input_layernorm.weight``     ``layers/{i}/attn_norm/scale``
``model.layers.{i}.self_attn.{q,k,v,o}_proj``   ``layers/{i}/attn/{q,k,v,o}_proj/kernel`` (T)
``model.layers.{i}.post_attention_layernorm``   ``layers/{i}/mlp_norm/scale``
``model.layers.{i}.mlp.{gate,up,down}_proj``    ``layers/{i}/mlp/{gate,up,down}_proj/kernel`` (T)
``model.norm.weight``                           ``norm/scale``
``lm_head.weight``                ``(V, D)``    ``lm_head/kernel`` (T); unused when tied
==============================================  =================================

(every layer name ends in ``.weight``). ``config.json`` fields read:
``model_type`` (``"llama"``), ``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``, ``head_dim``, ``rope_theta``, ``rms_norm_eps``,
``tie_word_embeddings``, ``max_position_embeddings``; ``rope_scaling``,
``attention_bias``, ``mlp_bias`` and activations other than SiLU are refused.

Example::

  model = load_safetensors("checkpoints/SmolLM2-135M")   # folder with config.json
  logits = model(jnp.array([[1, 2, 3]]))
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open

from jaxcomp.models.io._build import Source
from jaxcomp.models.io._build import build_llama
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama",)

_BLOCK_TENSORS = {  # our module path under layers/{i} -> (HF suffix, transpose)
    "attn_norm/scale": ("input_layernorm", False),
    "attn/q_proj/kernel": ("self_attn.q_proj", True),
    "attn/k_proj/kernel": ("self_attn.k_proj", True),
    "attn/v_proj/kernel": ("self_attn.v_proj", True),
    "attn/o_proj/kernel": ("self_attn.o_proj", True),
    "mlp_norm/scale": ("post_attention_layernorm", False),
    "mlp/gate_proj/kernel": ("mlp.gate_proj", True),
    "mlp/up_proj/kernel": ("mlp.up_proj", True),
    "mlp/down_proj/kernel": ("mlp.down_proj", True),
}

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_REQUIRED = object()


def hf_config(config: str | os.PathLike | dict[str, Any], **overrides: Any) -> LlamaConfig:
  """A :class:`LlamaConfig` (``rope_style="half"``) from a Hugging Face ``config.json``.

  Args:
    config: the checkpoint folder, the ``config.json`` path, or its parsed dict.
    **overrides: :class:`LlamaConfig` fields to set (``dtype``, ``max_seq_len``, ...).

  Raises:
    ValueError: an unsupported ``model_type``, a missing field, or a feature the
      model lacks (``rope_scaling``, biases, non-SiLU activation), naming the field.

  Example::

    cfg = hf_config({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 128, "rms_norm_eps": 1e-5})
  """
  if not isinstance(config, dict):
    path = pathlib.Path(config)
    if path.is_dir():
      path = path / "config.json"
    config = json.loads(path.read_text())

  def get(key: str, default: Any = _REQUIRED) -> Any:
    if key not in config or config[key] is None:
      if default is _REQUIRED:
        raise ValueError(f"config.json field {key!r} is missing")
      return default
    return config[key]

  model_type = get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not supported "
                     f"(supported: {SUPPORTED_MODEL_TYPES})")
  if get("rope_scaling", None) is not None:
    raise ValueError(f"config.json rope_scaling={config['rope_scaling']!r} is not supported")
  for key in ("attention_bias", "mlp_bias"):
    if get(key, False):
      raise ValueError(f"config.json {key}=true is not supported (no biases)")
  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={config['hidden_act']!r} is not supported")
  n_heads = int(get("num_attention_heads"))
  dim = int(get("hidden_size"))
  head_dim = get("head_dim", None)
  if head_dim is not None and int(head_dim) * n_heads == dim:
    head_dim = None  # The default; keeps configs comparable.
  fields = dict(
      vocab_size=int(get("vocab_size")),
      dim=dim,
      n_layers=int(get("num_hidden_layers")),
      n_heads=n_heads,
      n_kv_heads=int(get("num_key_value_heads", n_heads)),
      head_dim=None if head_dim is None else int(head_dim),
      ffn_dim=int(get("intermediate_size")),
      rope_theta=float(get("rope_theta", 10_000.0)),
      norm_eps=float(get("rms_norm_eps")),
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      rope_style="half",
      max_seq_len=int(get("max_position_embeddings", 2048)),
  )
  return LlamaConfig(**{**fields, **overrides})


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [folder / f for f in files]
  single = folder / "model.safetensors"
  if not single.is_file():
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder}")
  return [single]


def load_safetensors(folder: str | os.PathLike, **overrides: Any) -> Llama:
  """Loads a Hugging Face Llama checkpoint folder as a :class:`Llama`.

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` (or an index and shards).
    **overrides: :class:`LlamaConfig` fields (``dtype``, ``param_dtype``,
      ``max_seq_len``); ``rope_style`` stays ``"half"``.

  Returns:
    The model; kernels are the checkpoint's weights transposed to ``(in, out)``.

  Raises:
    ValueError: bad config, a missing, unexpected or wrongly shaped tensor;
      the message names it.

  Example::

    model = load_safetensors("SmolLM2-135M", dtype=jnp.bfloat16)
  """
  folder = pathlib.Path(folder)
  if "rope_style" in overrides:
    raise ValueError("rope_style is fixed to 'half' for Hugging Face checkpoints")
  cfg = hf_config(folder, **overrides)
  with contextlib.ExitStack() as stack:
    handles = {}  # tensor name -> open shard
    for shard in _shards(folder):
      # framework="flax": numpy cannot read bfloat16, the usual HF dtype.
      f = stack.enter_context(safe_open(shard, framework="flax"))
      handles.update((name, f) for name in f.keys())
    return _load(cfg, handles)


def _load(cfg: LlamaConfig, handles: dict[str, Any]) -> Llama:
  def source(name: str, transpose: bool = False) -> Source:
    def load() -> np.ndarray:
      x = np.asarray(handles[name].get_tensor(name))
      return x.T if transpose else x
    return Source(name, load)

  sources = {"embed/embedding": source("model.embed_tokens.weight"),
             "norm/scale": source("model.norm.weight")}
  if not cfg.tie_embeddings:
    sources["lm_head/kernel"] = source("lm_head.weight", transpose=True)
  for i in range(cfg.n_layers):
    for ours, (suffix, transpose) in _BLOCK_TENSORS.items():
      sources[f"layers/{i}/{ours}"] = source(f"model.layers.{i}.{suffix}.weight", transpose)
  for src in sources.values():
    if src.name not in handles:
      raise ValueError(f"safetensors tensor {src.name!r} is missing")
  used = {src.name for src in sources.values()}
  if cfg.tie_embeddings:
    used.add("lm_head.weight")  # Some tied checkpoints store a copy.
  extra = sorted(n for n in set(handles) - used if not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise ValueError(f"safetensors tensor {extra[0]!r} is not used by the Llama model "
                     f"({len(extra)} unexpected tensors)")
  return build_llama(cfg, sources)
