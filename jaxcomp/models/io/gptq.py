"""Hugging Face GPTQ checkpoints: a packed jaxcomp Llama written as, and read back from,
safetensors in the GPTQ layout (``quantization_config.quant_method = "gptq"``).

The layout, as the AutoGPTQ / Transformers GPTQ integration describes its checkpoints
(``checkpoint_format = "gptq"``, the original "v1" format), for one ``nn.Linear`` of ``K``
inputs and ``N`` outputs quantized to ``b`` bits in groups of ``g`` (``g = K`` per channel,
written ``group_size = -1``), ``G = ceil(K / g)``:

=====================  ==========================  ==========================================
tensor                 shape, dtype                content
=====================  ==========================  ==========================================
``{layer}.qweight``    ``(K * b / 32, N)`` int32   unsigned codes ``q`` in ``[0, 2^b)``, packed
                                                   along K: input ``k`` sits in word
                                                   ``k * b // 32`` at bit ``(k * b) % 32``
``{layer}.qzeros``     ``(G, N * b / 32)`` int32   zero points minus one, packed along N alike
``{layer}.scales``     ``(G, N)`` float16          one scale per group and output
``{layer}.g_idx``      ``(K,)`` int32              the group of each input (``k // g`` here)
=====================  ==========================  ==========================================

``w[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))``. jaxcomp's
symmetric grids (``{-(2^(b-1)-1) .. 2^(b-1)-1}``, or the full ``{-2^(b-1) .. 2^(b-1)-1}``) map to
``q = v + 2^(b-1)`` with the zero point ``2^(b-1)`` (stored as ``2^(b-1) - 1``). Bit widths 2, 4
and 8 (32 / b whole codes a word). Everything else of the model (embedding, norms, an untied
head) is written in float32 under its usual Hugging Face name (`load_safetensors`' table), with
``config.json`` (the Llama fields and ``quantization_config``).

Round trip: a packed model whose scales are float16 values (`jaxcomp.Quant.scale_dtype` =
``"float16"``) comes back bit for bit (`load_gptq` into ``like`` = its packed skeleton).
Refused in one line: float32 scales that float16 cannot hold, asymmetric grids, other bit
widths, float formats, stacked (``scan_layers``) models, and on reading, a ``g_idx`` that
reorders inputs (``desc_act`` checkpoints) or a config that is not GPTQ.

Example::

  packed = jc.convert(jc.ptq(model, recipe_fp16_scales, calib=tokens))
  save_gptq(packed, "out/smollm2-gptq")             # model.safetensors + config.json
  like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(cfg, rngs=nnx.Rngs(0)), recipe))
  again = load_gptq("out/smollm2-gptq", like)       # the same packed model
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxcomp.models.io.safetensors import _BLOCK_TENSORS  # pylint: disable=protected-access
from jaxcomp.models.llama import Llama
from jaxcomp.quant.qarray import QArray, pack_bits

_BITS = (2, 4, 8)


def _hf_names(model: Llama) -> dict[str, str]:
  """Our parameter paths ("layers/0/attn/q_proj/kernel") -> Hugging Face prefixes / names."""
  cfg = model.config
  if getattr(cfg, "scan_layers", False):
    raise ValueError("GPTQ checkpoints: a scan_layers model stacks its blocks; unroll it first "
                     "(jaxcomp.models.llama.unroll_layers)")
  names = {"embed/embedding": "model.embed_tokens.weight", "norm/scale": "model.norm.weight"}
  if not cfg.tie_embeddings:
    names["lm_head/kernel"] = "lm_head"
  for i in range(cfg.n_layers):
    for ours, (suffix, _) in _BLOCK_TENSORS.items():
      hf = f"model.layers.{i}.{suffix}"
      names[f"layers/{i}/{ours}"] = hf if ours.endswith("/kernel") else hf + ".weight"
  return names


def _pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes (..., L) -> int32 words (..., L * bits / 32), packed along the last axis."""
  per = 32 // bits
  c = codes.astype(np.uint32).reshape(codes.shape[:-1] + (-1, per))
  words = np.zeros(c.shape[:-1], np.uint32)
  for j in range(per):
    words |= c[..., j] << np.uint32(bits * j)
  return words.view(np.int32)


def _unpack_words(words: np.ndarray, bits: int) -> np.ndarray:
  """Inverse of `_pack_words`: int32 words (..., W) -> unsigned codes (..., W * 32 / bits)."""
  per = 32 // bits
  w = words.view(np.uint32)[..., None] >> (np.arange(per, dtype=np.uint32) * bits)
  return (w & np.uint32((1 << bits) - 1)).reshape(words.shape[:-1] + (-1,)).astype(np.int64)


def _layer_tensors(path: str, qa: QArray) -> dict[str, np.ndarray]:
  """The four GPTQ tensors of one packed (K, N) kernel."""
  if qa.fmt != "int" or qa.zero_point is not None or qa.bits not in _BITS:
    raise ValueError(f"save_gptq: {path} is a {qa.bits}-bit {qa.fmt} grid"
                     f"{' with zero points' if qa.zero_point is not None else ''}; GPTQ "
                     f"checkpoints hold symmetric integer grids of {', '.join(map(str, _BITS))} bits")
  if qa.contracting != (0,) or len(qa.shape) != 2:
    raise ValueError(f"save_gptq: {path} has kernel shape {qa.shape} contracting {qa.contracting}; "
                     "GPTQ layers are (K, N) kernels contracting axis 0")
  scale = np.asarray(qa.scales(), np.float32)  # (N, G)
  half = scale.astype(np.float16)
  if not np.array_equal(half.astype(np.float32), scale, equal_nan=True):
    bad = np.argwhere(half.astype(np.float32) != scale)[0]
    raise ValueError(f"save_gptq: {path} has a scale float16 cannot hold ({scale[tuple(bad)]!r} at "
                     f"{tuple(int(i) for i in bad)}); quantize with Quant(scale_dtype='float16')")
  k, n = qa.shape
  ints = np.asarray(qa.ints(), np.int64).T  # (K, N)
  offset = 1 << (qa.bits - 1)
  group = qa.group or k
  g = half.shape[1]
  zeros = np.full((g, n), offset - 1, np.int64)  # v1 stores the zero point minus one
  return {f"{path}.qweight": _pack_words((ints + offset).T, qa.bits).T.copy(),
          f"{path}.qzeros": _pack_words(zeros, qa.bits),
          f"{path}.scales": np.ascontiguousarray(half.T),
          f"{path}.g_idx": (np.arange(k) // group).astype(np.int32)}


def save_gptq(model: Llama, folder: str | os.PathLike) -> pathlib.Path:
  """Writes a packed Llama (`jaxcomp.convert`) as a Hugging Face GPTQ checkpoint in ``folder``
  (created; must not exist): ``model.safetensors`` and ``config.json``.

  Every quantized projection must hold a symmetric integer grid of 2, 4 or 8 bits whose scales
  float16 holds exactly (`jaxcomp.Quant` with ``scale_dtype="float16"``), all with the same
  bits and group size (one ``quantization_config``); the rest is written in float32.

  Args:
    model: a packed NNX `Llama` (unrolled blocks).
    folder: the checkpoint folder to create.

  Returns:
    ``folder`` as a path.

  Raises:
    ValueError: one line naming the layer that a GPTQ checkpoint cannot hold, or mixed bits /
      groups; FileExistsError: ``folder`` exists.

  Example::

    save_gptq(jc.convert(ptq_model), "out/smollm2-gptq")
  """
  folder = pathlib.Path(folder)
  if folder.exists():
    raise FileExistsError(f"save_gptq: {folder} already exists")
  names = _hf_names(model)
  tensors: dict[str, np.ndarray] = {}
  quant: set[tuple[int, int]] = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    ours = "/".join(str(p) for p in path)
    if ours not in names:
      raise ValueError(f"save_gptq: parameter {ours} has no Hugging Face name (a Llama with "
                       "biases or extra modules?)")
    value = var.get_value()
    if isinstance(value, QArray):
      tensors.update(_layer_tensors(names[ours], value))
      quant.add((value.bits, value.group or -1))
    else:
      x = np.asarray(value, np.float32)
      tensors[names[ours] + (".weight" if ours == "lm_head/kernel" else "")] = (
          np.ascontiguousarray(x.T) if ours.endswith("/kernel") else x)
  if len(quant) != 1:
    raise ValueError(f"save_gptq: one bit width and group size per checkpoint; the model has "
                     f"{sorted(quant) or 'no quantized layer'} (bits, group)")
  (bits, group), = quant
  cfg = model.config
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
      "head_dim": cfg.head_dim or cfg.dim // cfg.n_heads, "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len,
      "torch_dtype": "float16",
      "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group,
                              "desc_act": False, "sym": True, "checkpoint_format": "gptq"},
  }
  tmp = folder.with_name(folder.name + ".tmp")
  tmp.mkdir(parents=True)
  save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  (tmp / "config.json").write_text(json.dumps(config, indent=2))
  tmp.rename(folder)  # nothing half-written under the final name
  return folder


def load_gptq(folder: str | os.PathLike, like: Llama) -> Llama:
  """Reads a Hugging Face GPTQ checkpoint into the packed structure of ``like``.

  Args:
    folder: a folder with ``config.json`` (``quantization_config.quant_method == "gptq"``,
      ``checkpoint_format`` "gptq", symmetric) and ``model.safetensors``.
    like: a packed Llama of the checkpoint's structure, e.g. ``nnx.eval_shape`` of
      `jaxcomp.packed_skeleton` with a recipe of the checkpoint's bits and group size and
      ``scale_dtype="float16"``.

  Returns:
    The packed model with the checkpoint's weights.

  Raises:
    ValueError: one line: not a GPTQ config, desc_act / reordered ``g_idx``, asymmetric zero
      points, a missing tensor, or a shape that differs from ``like``'s (named).

  Example::

    again = load_gptq("out/smollm2-gptq", like)
  """
  folder = pathlib.Path(folder)
  try:
    config = json.loads((folder / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"load_gptq: {folder / 'config.json'} cannot be read: {e}") from None
  qc = config.get("quantization_config") or {}
  if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format", "gptq") != "gptq":
    raise ValueError(f"load_gptq: {folder / 'config.json'} is not a GPTQ (v1) checkpoint "
                     f"(quantization_config {qc or 'missing'})")
  if not qc.get("sym", True):
    raise ValueError("load_gptq: asymmetric GPTQ checkpoints (sym=false) are not supported")
  bits = int(qc["bits"])
  names = _hf_names(like)
  graph, state = nnx.split(like)
  flat = dict(nnx.to_flat_state(state))
  with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
    have = set(f.keys())

    def read(name: str) -> np.ndarray:
      if name not in have:
        raise ValueError(f"load_gptq: tensor {name!r} is missing from {folder}")
      return f.get_tensor(name)

    for path, var in flat.items():
      ours = "/".join(str(p) for p in path)
      if ours not in names:
        continue
      value = var.get_value()
      if isinstance(value, QArray):
        var.set_value(_read_layer(names[ours], value, bits, read))
      else:
        name = names[ours] + (".weight" if ours == "lm_head/kernel" else "")
        x = read(name)
        x = x.T if ours.endswith("/kernel") else x
        if tuple(x.shape) != tuple(value.shape):
          raise ValueError(f"load_gptq: {name} has shape {x.shape}, the model wants {value.shape}")
        var.set_value(jnp.asarray(x, value.dtype))
  return nnx.merge(graph, nnx.from_flat_state(flat))


def _read_layer(path: str, like: QArray, bits: int, read) -> QArray:
  """One packed kernel from its four GPTQ tensors, in ``like``'s QArray structure."""
  if like.bits != bits:
    raise ValueError(f"load_gptq: {path} is {bits}-bit in the checkpoint, {like.bits}-bit in like")
  k, n = like.shape
  codes = _unpack_words(read(f"{path}.qweight").T, bits).T[:k]  # (K, N)
  scales = read(f"{path}.scales")  # (G, N)
  zeros = _unpack_words(read(f"{path}.qzeros"), bits)[:, :n] + 1  # v1: stored minus one
  g_idx = read(f"{path}.g_idx")
  group = like.group or k
  if not np.array_equal(g_idx, np.arange(k) // group):
    raise ValueError(f"load_gptq: {path}.g_idx reorders the inputs (desc_act) or has another "
                     f"group size than {group}; only static groups in order are supported")
  offset = 1 << (bits - 1)
  if not (zeros == offset).all():
    raise ValueError(f"load_gptq: {path} has zero points other than {offset} (an asymmetric "
                     "grid); only symmetric checkpoints are supported")
  ints = jnp.asarray((codes - offset).T, jnp.int8)  # canonical (N, K)
  values = pack_bits(ints, bits, 1) if like.packed else ints
  scale = jnp.asarray(scales.T, like.scale.dtype)
  if values.shape != like.values.shape or scale.shape != like.scale.shape:
    raise ValueError(f"load_gptq: {path} holds values {values.shape} / scales {scale.shape}, "
                     f"like wants {like.values.shape} / {like.scale.shape}")
  return dataclasses.replace(like, values=values, scale=scale)
