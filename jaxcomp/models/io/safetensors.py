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
    ValueError: an unreadable file or invalid JSON (naming the path, line and column),
      an unsupported ``model_type``, a missing field or one of the wrong type, or a
      feature the model lacks (``rope_scaling``, biases, non-SiLU activation), naming
      the field and, when read from a file, the path; always one line.

  Example::

    cfg = hf_config({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 128, "rms_norm_eps": 1e-5})
  """
  where = "config.json"
  if not isinstance(config, dict):
    path = pathlib.Path(config)
    if path.is_dir():
      path = path / "config.json"
    where = str(path)
    config = _read_json(path)
    if not isinstance(config, dict):
      raise ValueError(f"{where}: expected a JSON object, got a {type(config).__name__}")
  try:
    fields = _fields_from(config, where)
  except (TypeError, ValueError) as e:
    message = " ".join(str(e).split())
    raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
  return LlamaConfig(**{**fields, **overrides})


def _read_json(path: pathlib.Path) -> Any:
  """The parsed JSON file at ``path``; a missing / unreadable file or invalid JSON is a one-line
  `ValueError` naming the path (and the line and column of a syntax error)."""
  try:
    text = path.read_text()
  except OSError as e:
    raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                     ) from None


def _fields_from(config: dict[str, Any], where: str) -> dict[str, Any]:
  """The `LlamaConfig` fields of a parsed ``config.json`` (``where`` names it in errors)."""

  def get(key: str, default: Any = _REQUIRED) -> Any:
    if key not in config or config[key] is None:
      if default is _REQUIRED:
        raise ValueError(f"{where}: field {key!r} is missing")
      return default
    return config[key]

  def number(key: str, kind: type, default: Any = _REQUIRED) -> Any:
    value = get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind is int and value != int(value)):
      raise ValueError(f"{where}: field {key!r} must be a{'n integer' if kind is int else ' number'}"
                       f", got {value!r}")
    return kind(value)

  model_type = get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{where}: model_type={model_type!r} is not supported "
                     f"(supported: {SUPPORTED_MODEL_TYPES})")
  if get("rope_scaling", None) is not None:
    raise ValueError(f"{where}: rope_scaling={config['rope_scaling']!r} is not supported")
  for key in ("attention_bias", "mlp_bias"):
    if get(key, False):
      raise ValueError(f"{where}: {key}=true is not supported (no biases)")
  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={config['hidden_act']!r} is not supported")
  n_heads = number("num_attention_heads", int)
  dim = number("hidden_size", int)
  head_dim = get("head_dim", None)
  if head_dim is not None:
    head_dim = number("head_dim", int)
    if head_dim * n_heads == dim:
      head_dim = None  # The default; keeps configs comparable.
  fields = dict(
      vocab_size=number("vocab_size", int),
      dim=dim,
      n_layers=number("num_hidden_layers", int),
      n_heads=n_heads,
      n_kv_heads=number("num_key_value_heads", int, n_heads),
      head_dim=head_dim,
      ffn_dim=number("intermediate_size", int),
      rope_theta=number("rope_theta", float, 10_000.0),
      norm_eps=number("rms_norm_eps", float),
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      rope_style="half",
      max_seq_len=number("max_position_embeddings", int, 2048),
  )
  return fields


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) for f in weight_map.values()):
      raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
    return [folder / f for f in sorted(set(weight_map.values()))]
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
    ValueError: a bad ``config.json`` or index (naming the path), an unreadable
      shard, a missing, unexpected or wrongly shaped tensor, or a tensor holding a
      NaN or inf; one line naming it.

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
      try:
        f = stack.enter_context(safe_open(shard, framework="flax"))
      except Exception as e:  # safetensors' own error types, OSError
        detail = " ".join(str(e).split())
        raise ValueError(f"{shard}: not a readable safetensors file ({detail})") from None
      handles.update((name, f) for name in f.keys())
    return _load(cfg, handles, origin=str(folder))


def _load(cfg: LlamaConfig, handles: dict[str, Any], origin: str = "") -> Llama:
  def source(name: str, transpose: bool = False) -> Source:
    def load() -> np.ndarray:
      try:
        x = np.asarray(handles[name].get_tensor(name))
      except Exception as e:  # a shard whose data is cut after its header
        detail = " ".join(str(e).split())
        raise ValueError(f"{origin}: tensor {name} cannot be read ({detail})") from None
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
  return build_llama(cfg, sources, origin=origin)
