"""Llama-family decoder (Llama 2/3, SmolLM2, ...) as an NNX module.

``Llama(config, rngs=...)`` maps ``tokens: int[B, T]`` to
``logits: dtype[B, T, vocab_size]``. Each block is pre-norm::

  h   = x + attn(attn_norm(x))        # causal GQA with RoPE, softmax in f32
  out = h + mlp(mlp_norm(h))          # SwiGLU: down(silu(gate(h)) * up(h))

Module paths, as rewrite rules see them (``nnx.iter_graph`` yields
``("layers", 0, "attn", "q_proj")`` for ``layers/0/attn/q_proj``); every
projection is a plain ``nnx.Linear`` (no bias) called normally, so a rewrite
can swap its ``dot_general`` or replace the module:

=============================  ===========  =======================  ==========================
path                           module       param: shape             logical axes
=============================  ===========  =======================  ==========================
``embed``                      nnx.Embed    embedding: [V, D]        ("vocab", "embed")
``layers/{i}/attn_norm``       RMSNorm      scale: [D]               ("norm",)
``layers/{i}/attn/q_proj``     nnx.Linear   kernel: [D, H*Dh]        ("embed", "q_heads")
``layers/{i}/attn/k_proj``     nnx.Linear   kernel: [D, KV*Dh]       ("embed", "kv_heads")
``layers/{i}/attn/v_proj``     nnx.Linear   kernel: [D, KV*Dh]       ("embed", "kv_heads")
``layers/{i}/attn/o_proj``     nnx.Linear   kernel: [H*Dh, D]        ("q_heads", "embed")
``layers/{i}/mlp_norm``        RMSNorm      scale: [D]               ("norm",)
``layers/{i}/mlp/gate_proj``   nnx.Linear   kernel: [D, F]           ("embed", "mlp")
``layers/{i}/mlp/up_proj``     nnx.Linear   kernel: [D, F]           ("embed", "mlp")
``layers/{i}/mlp/down_proj``   nnx.Linear   kernel: [F, D]           ("mlp", "embed")
``norm``                       RMSNorm      scale: [D]               ("norm",)
``lm_head`` (untied only)      nnx.Linear   kernel: [D, V]           ("embed", "vocab")
=============================  ===========  =======================  ==========================

The names are stored as each Variable's ``out_sharding`` metadata (read them
with ``var.get_metadata("out_sharding")``) and resolved by a rules table::

  with nnx.logical_axis_rules([("vocab", "model"), ("embed", None), ...]):
    shardings = nnx.get_named_sharding(nnx.state(model), mesh)

RoPE comes in two weight layouts: ``"half"`` (Hugging Face ``rotate_half``:
dimension ``i`` pairs with ``i + Dh/2``) and ``"interleaved"`` (Meta / GGUF /
GPT-J: dimension ``2i`` pairs with ``2i + 1``). They give the same logits when
the q/k kernels are permuted with :func:`permute_rope_kernel`.

Example::

  from flax import nnx
  import jax.numpy as jnp
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((2, 8), jnp.int32))        # float32[2, 8, 256]
  logits, hiddens = model(jnp.zeros((2, 8), jnp.int32), return_hidden=True)

Incremental decoding keeps each layer's keys and values in a :class:`KVCache`
(``k``/``v``: ``[n_layers, B, KV, S_max, Dh]``, the ``KV`` axis is what
``"kv_heads"`` shards). ``model(tokens, cache=cache)`` appends ``tokens`` at
``cache.index`` and returns ``(logits, new_cache)``; :func:`generate` decodes
greedily and :func:`make_decode_fns` gives its jitted prefill / decode steps::

  cache = model.init_cache(batch_size=2, max_len=32)
  logits, cache = model(prompt, cache=cache)           # prefill, [2, T, 256]
  logits, cache = model(next_tok[:, None], cache=cache)  # one step, [2, 1, 256]
  tokens = generate(model, prompt, max_new_tokens=16)   # int32[2, T + 16]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import einops
from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.models.partitioning import axes
from jaxcomp.models.partitioning import constrain
from jaxcomp.models.partitioning import shards
from jaxcomp.quant import hadamard

# Every logical axis name a Llama parameter uses; a rules table must map each.
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "mlp", "norm")

ROPE_STYLES = ("half", "interleaved")

# Hugging Face's `initializer_range`: N(0, 0.02) for every matrix.
_INIT = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder, validated at construction.

  Example::

    cfg = LlamaConfig.tiny(n_layers=4)
    cfg = LlamaConfig.smollm2_135m(dtype=jnp.bfloat16)
  """

  vocab_size: int  # V: number of token ids.
  dim: int  # D: width of the residual stream.
  n_layers: int  # number of decoder blocks.
  n_heads: int  # H: query heads.
  n_kv_heads: int  # KV: key/value heads (GQA); divides n_heads.
  ffn_dim: int  # F: hidden width of the SwiGLU MLP.
  head_dim: int | None = None  # Dh: width of one head; None -> dim // n_heads.
  rope_theta: float = 10_000.0  # RoPE base frequency.
  norm_eps: float = 1e-5  # RMSNorm epsilon.
  tie_embeddings: bool = False  # logits = embed.attend(h), no lm_head.
  rope_style: str = "half"  # "half" (HF rotate_half) or "interleaved" (GGUF).
  max_seq_len: int = 2048  # longest sequence the model accepts.
  # Sequences per attention chunk (a loop over the batch); None: the whole batch at once.
  # Bounds the [B, H, T, T] score memory; on CPU, 1 keeps the scores in cache (~2x faster).
  attn_batch_chunk: int | None = None
  # Queries per causal block when attending over the call's own tokens (no cache, or a
  # fresh cache): block i reads keys [0, (i + 1) c) only, so the masked upper triangle is
  # never computed (n blocks: (n + 1) / 2n of the T x T work). None: one T x T block.
  attn_query_chunk: int | None = 128
  dtype: Any = jnp.float32  # compute dtype (activations, logits).
  param_dtype: Any = jnp.float32  # storage dtype of the parameters.
  # One stacked Block (nnx.vmap, leading axis "layers") run by nnx.scan instead of a list of
  # n_layers Blocks: one block to compile, as MaxText's scan_layers (`scan_layers` / `unroll`).
  scan_layers: bool = False
  # The MLP's hidden activation goes through a Hadamard transform (`jaxcomp.quant.hadamard.fwht`)
  # before down_proj, whose kernel holds the inverse (`rotate_llama`: QuaRot's online rotation).
  ffn_hadamard: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                 "ffn_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"LlamaConfig.n_heads={self.n_heads} must be divisible by "
          f"n_kv_heads={self.n_kv_heads}")
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(
            f"LlamaConfig.dim={self.dim} must be divisible by "
            f"n_heads={self.n_heads} when head_dim is None")
    elif (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
          or self.head_dim <= 0):
      raise ValueError(
          f"LlamaConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
    if self.resolved_head_dim % 2:
      raise ValueError(
          f"LlamaConfig.head_dim={self.resolved_head_dim} must be even for RoPE")
    if not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
    for name in ("attn_batch_chunk", "attn_query_chunk"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value <= 0):
        raise ValueError(f"LlamaConfig.{name} must be a positive int or None, got {value!r}")
    if self.rope_style not in ROPE_STYLES:
      raise ValueError(
          f"LlamaConfig.rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"LlamaConfig.{name} must be a floating dtype, got {value!r}")

  @property
  def resolved_head_dim(self) -> int:
    """Dh: ``head_dim`` if set, else ``dim // n_heads``."""
    return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

  @classmethod
  def tiny(cls, **overrides: Any) -> LlamaConfig:
    """A 2-layer, 64-wide GQA model (~0.1M params) for tests and demos."""
    fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_dim=128, max_seq_len=256)
    return cls(**{**fields, **overrides})

  @classmethod
  def smollm2_135m(cls, **overrides: Any) -> LlamaConfig:
    """HuggingFaceTB/SmolLM2-135M (134,515,008 params, tied embeddings)."""
    fields = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9,
                  n_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100_000.0,
                  norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)
    return cls(**{**fields, **overrides})

  @classmethod
  def llama3_8b(cls, **overrides: Any) -> LlamaConfig:
    """Meta Llama-3-8B's shapes (8,030,261,248 params; GQA 32 / 8 heads, untied head), from
    its published ``config.json``: for compile-only dry runs (no weights are fetched)."""
    fields = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                  head_dim=128, ffn_dim=14336, rope_theta=500_000.0, norm_eps=1e-5,
                  tie_embeddings=False, max_seq_len=8192)
    return cls(**{**fields, **overrides})


# --------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float,
               style: str = "half") -> jax.Array:
  r"""Rotates feature pairs of ``x`` by position-dependent angles (RoPE).

  For pair ``i`` of a head (``i < Dh/2``), with angle
  :math:`\phi_i = p \cdot \theta^{-2i/D_h}`,

  .. math::
    (x_a, x_b) \mapsto (x_a \cos\phi_i - x_b \sin\phi_i,\;
                        x_b \cos\phi_i + x_a \sin\phi_i)

  where ``(a, b) = (i, i + Dh/2)`` for ``style="half"`` and
  ``(2i, 2i + 1)`` for ``style="interleaved"``. Computed in float32.

  Args:
    x: ``[B, T, heads, Dh]`` queries or keys.
    positions: ``int[B, T]`` position of each token.
    theta: base frequency (``rope_theta``).
    style: ``"half"`` or ``"interleaved"``.

  Returns:
    ``[B, T, heads, Dh]``, dtype of ``x``.

  Example::

    q = apply_rope(q, jnp.arange(8)[None], theta=10_000.0)

  Reference: Su et al., RoFormer, https://arxiv.org/abs/2104.09864.
  """
  head_dim = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B,T,1,Dh/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  if style == "half":
    xa, xb = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([xa * cos - xb * sin, xb * cos + xa * sin], axis=-1)
  elif style == "interleaved":
    xa, xb = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([xa * cos - xb * sin, xb * cos + xa * sin], axis=-1)
    out = out.reshape(x.shape)
  else:
    raise ValueError(f"style must be one of {ROPE_STYLES}, got {style!r}")
  return out.astype(x.dtype)


def permute_rope_kernel(kernel: Any, n_heads: int, *, to: str) -> Any:
  """Permutes q/k output columns between the two RoPE layouts.

  A model with ``rope_style="interleaved"`` and q/k kernels ``W`` gives the
  same logits as one with ``rope_style="half"`` and kernels
  ``permute_rope_kernel(W, n_heads, to="half")`` (this is the permutation
  Hugging Face's Llama conversion script applies to Meta checkpoints, and
  llama.cpp's GGUF conversion undoes). Works on numpy and jax arrays.

  Args:
    kernel: ``[in, n_heads * Dh]`` q_proj or k_proj kernel (k: pass
      ``n_kv_heads``).
    n_heads: number of heads the columns hold.
    to: target layout, ``"half"`` or ``"interleaved"``.

  Returns:
    The kernel with columns permuted within each head; same shape and dtype.

  Example::

    wq_half = permute_rope_kernel(wq_gguf, cfg.n_heads, to="half")
  """
  if to == "half":
    return einops.rearrange(kernel, "i (h d two) -> i (h two d)", h=n_heads, two=2)
  if to == "interleaved":
    return einops.rearrange(kernel, "i (h two d) -> i (h d two)", h=n_heads, two=2)
  raise ValueError(f"to must be one of {ROPE_STYLES}, got {to!r}")


# --------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for incremental decoding (a pytree).

  Slots ``[0, index)`` of the sequence axis hold the (RoPE-rotated) keys and
  the values of the tokens seen so far; later slots are ignored by the
  attention mask. All rows of the batch share ``index`` (no ragged prompts).
  Make one with :meth:`Llama.init_cache`; ``Llama.__call__`` returns the
  updated cache, this one is left as it was.

  Attributes:
    k: ``dtype[n_layers, B, KV, S_max, Dh]`` keys, in the model's compute dtype (heads
      before slots: a layer's keys are the attention GEMM's operand as stored, no transpose
      per decode step).
    v: ``dtype[n_layers, B, KV, S_max, Dh]`` values.
    index: ``int32[]`` number of sequence slots filled.

  Example::

    cache = model.init_cache(batch_size=2, max_len=64)
    logits, cache = model(prompt, cache=cache)   # cache.index == prompt.shape[1]
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    """S_max: number of sequence slots."""
    return self.k.shape[3]


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  r"""Root-mean-square norm, :math:`y = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}
  \cdot \mathrm{scale}`, computed in float32.

  Shapes: ``[..., dim] -> [..., dim]`` in ``dtype``. Param ``scale: [dim]``
  with logical axes ``("norm",)``.

  Example::

    y = RMSNorm(64, rngs=nnx.Rngs(0))(jnp.ones((2, 64)))

  Reference: Zhang & Sennrich, https://arxiv.org/abs/1910.07467.
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init; accepted for a uniform constructor.
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes("norm"))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises ``x: [..., dim]`` over its last axis."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _linear(config: LlamaConfig, d_in: int, d_out: int, names: tuple[str, str],
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=config.dtype,
                    param_dtype=config.param_dtype, kernel_init=_INIT,
                    kernel_metadata=axes(*names), rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE.

  Shapes: ``x: [B, T, D], positions: int[B, T] -> [B, T, D]``. Query head
  ``h`` reads key/value head ``h // (H / KV)`` (Hugging Face ``repeat_kv``
  order). Scores and softmax are float32.

  Example::

    y = Attention(LlamaConfig.tiny(), rngs=nnx.Rngs(0))(x, jnp.arange(8)[None])

  Reference: Ainslie et al., GQA, https://arxiv.org/abs/2305.13245.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    hd = config.resolved_head_dim
    q_dim, kv_dim = config.n_heads * hd, config.n_kv_heads * hd
    self.q_proj = _linear(config, config.dim, q_dim, ("embed", "q_heads"), rngs)
    self.k_proj = _linear(config, config.dim, kv_dim, ("embed", "kv_heads"), rngs)
    self.v_proj = _linear(config, config.dim, kv_dim, ("embed", "kv_heads"), rngs)
    self.o_proj = _linear(config, q_dim, config.dim, ("q_heads", "embed"), rngs)
    self.n_kv_heads = config.n_kv_heads
    self.head_dim = hd
    self.rope_theta = config.rope_theta
    self.rope_style = config.rope_style
    self.attn_batch_chunk = config.attn_batch_chunk
    self.attn_query_chunk = config.attn_query_chunk

  def __call__(
      self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
      layer: int = 0, fresh_cache: bool = False,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Attends each token to itself and the tokens before it.

    Args:
      x: ``[B, T, D]`` inputs.
      positions: ``int[B, T]`` RoPE positions.
      cache: if given, this call's keys and values are written to slots
        ``[index, index + T)`` of layer ``layer`` and token ``t`` attends to
        slots ``< index + t + 1``; ``cache.index`` is not advanced.
      layer: which layer of ``cache`` this module owns (static).
      fresh_cache: the cache holds nothing yet (``index == 0``): attend over
        this call's keys only, causally in query blocks, instead of over all
        ``S_max`` slots (same result, less work; a prefill).

    Returns:
      ``[B, T, D]``; with ``cache``, ``(out, cache)`` with the layer written.
    """
    hd, kv = self.head_dim, self.n_kv_heads
    rope = functools.partial(apply_rope, positions=positions,
                             theta=self.rope_theta, style=self.rope_style)
    q = rope(einops.rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=hd))
    k = rope(einops.rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=hd))
    v = einops.rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=hd)
    causal = cache is None or fresh_cache
    k = einops.rearrange(k, "b s k d -> b k s d")
    v = einops.rearrange(v, "b s k d -> b k s d")
    if cache is not None:
      start = (layer, 0, 0, cache.index, 0)
      cache = dataclasses.replace(
          cache,
          k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start),
          v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start))
      if fresh_cache:  # attend in the cache's dtype, as the non-fresh path does
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
      else:
        k, v = cache.k[layer], cache.v[layer]  # [B, KV, S_max, Dh]
    # Heads first, each KV group's queries stacked along the rows: both attention matmuls
    # are plain batched GEMMs contracting their operands' last / leading axes (about 1.7x
    # faster on CPU than einsums over [b, t, k, g, d], with identical results).
    t, g = x.shape[1], q.shape[2] // kv
    q = einops.rearrange(q, "b t (k g) d -> b k g t d", k=kv)

    def attend(q, k, v, mask):  # [b, k, g, c, d], [b, k, s, d] x2, bool[c, s] -> like q
      b, c, s = q.shape[0], q.shape[3], k.shape[2]
      scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kv, g * c, hd), k,
                          preferred_element_type=jnp.float32) * hd**-0.5
      scores = jnp.where(mask, scores.reshape(b, kv, g, c, s), jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv, g * c, s), v)
      return out.reshape(b, kv, g, c, hd)

    def attend_all(q, k, v):
      if not causal:  # slot s is visible to new token i iff s <= index + i
        slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        return attend(q, k, v, slots <= cache.index + jnp.arange(t, dtype=jnp.int32)[:, None])
      size = self.attn_query_chunk or t
      outs = []
      for lo in range(0, t, size):  # query block [lo, hi) reads keys [0, hi)
        hi = min(lo + size, t)
        mask = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
        outs.append(attend(q[:, :, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask))
      return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)

    # attn_batch_chunk sequences at a time *per batch shard*: the loop runs over the index
    # within a shard, so every shard of a sharded batch works in each step (a loop over the
    # global batch would run each sequence's attention on every device).
    chunk, b, n = self.attn_batch_chunk, x.shape[0], shards("act_batch")
    n = n if b % n == 0 else 1  # a batch the shards do not divide stays whole (unsharded)
    per = b // n
    if chunk is None or chunk >= per or per % chunk:
      out = attend_all(q, k, v)
    else:
      def split(a):  # [B, ...] -> [per / chunk, n * chunk, ...]: step i takes `chunk` per shard
        a = jnp.moveaxis(a.reshape((n, per // chunk, chunk) + a.shape[1:]), 1, 0)
        return a.reshape((per // chunk, n * chunk) + a.shape[3:])

      out = jax.lax.map(lambda a: attend_all(*a), (split(q), split(k), split(v)))
      out = out.reshape((per // chunk, n, chunk) + out.shape[2:])
      out = jnp.moveaxis(out, 0, 1).reshape((b,) + out.shape[3:])
    out = self.o_proj(einops.rearrange(out, "b k g t d -> b t (k g d)"))
    return out if cache is None else (out, cache)


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, ``[..., D] -> [..., D]``.

  Example::

    y = MLP(LlamaConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 8, 64)))

  Reference: Shazeer, GLU Variants, https://arxiv.org/abs/2002.05202.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.dim, config.ffn_dim
    self.gate_proj = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.up_proj = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.down_proj = _linear(config, f, d, ("mlp", "embed"), rngs)
    self.ffn_hadamard = config.ffn_hadamard

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the gated MLP position-wise."""
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    if self.ffn_hadamard:  # online rotation: down_proj's kernel holds its inverse
      hidden = hadamard.fwht(hidden)
    return self.down_proj(constrain(hidden, "act_batch", "act_seq", "act_mlp"))


class Block(nnx.Module):
  """One pre-norm decoder block, ``[B, T, D] -> [B, T, D]``.

  Example::

    y = Block(LlamaConfig.tiny(), rngs=nnx.Rngs(0))(x, jnp.arange(8)[None])
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    norm = functools.partial(RMSNorm, config.dim, eps=config.norm_eps,
                             dtype=config.dtype, param_dtype=config.param_dtype)
    self.attn_norm = norm()
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, rngs=rngs)

  def __call__(
      self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
      layer: int = 0, fresh_cache: bool = False,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Adds attention then MLP to the residual stream ``x``.

    With ``cache``, returns ``(out, cache)`` (see :meth:`Attention.__call__`).
    """
    if cache is None:
      h = x + self.attn(self.attn_norm(x), positions)
      return h + self.mlp(self.mlp_norm(h))
    a, cache = self.attn(self.attn_norm(x), positions, cache, layer, fresh_cache)
    h = x + a
    return h + self.mlp(self.mlp_norm(h)), cache


class Llama(nnx.Module):
  """Llama-family decoder-only language model (see the module docstring).

  Attributes:
    config: the :class:`LlamaConfig`.
    embed: ``nnx.Embed`` token embedding ``[V, D]``.
    layers: ``nnx.List`` of :class:`Block`.
    norm: final :class:`RMSNorm`.
    lm_head: ``nnx.Linear`` ``[D, V]``; only when ``not tie_embeddings``.

  Example::

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    logits = model(tokens)                                  # [B, T, V]
    logits, hiddens = model(tokens, return_hidden=True)     # n_layers x [B, T, D]
    logits, cache = model(tokens, cache=model.init_cache(B, 64))  # KV-cached
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=config.dtype,
                           param_dtype=config.param_dtype, embedding_init=_INIT,
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    if config.scan_layers:
      @nnx.split_rngs(splits=config.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stack(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

      self.layers = stack(rngs)
    else:
      self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=config.dtype,
                        param_dtype=config.param_dtype)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, config.dim, config.vocab_size,
                             ("embed", "vocab"), rngs)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache` for ``batch_size`` rows of up to ``max_len`` tokens.

    Args:
      batch_size: B.
      max_len: S_max, ``<= config.max_seq_len``; prompt plus generated tokens.

    Returns:
      ``KVCache`` with zero ``k``/``v`` of shape ``[n_layers, B, KV, S_max, Dh]``
      in ``config.dtype`` and ``index = 0``.

    Example::

      cache = model.init_cache(batch_size=2, max_len=64)
    """
    cfg = self.config
    if not 0 < max_len <= cfg.max_seq_len:
      raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
    return KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   index=jnp.zeros((), jnp.int32))

  def __call__(
      self, tokens: jax.Array, *, positions: jax.Array | None = None,
      return_hidden: bool = False, cache: KVCache | None = None,
      fresh_cache: bool = False,
  ) -> jax.Array | tuple[Any, ...]:
    """Computes next-token logits.

    Args:
      tokens: ``int[B, T]`` token ids, ``T <= config.max_seq_len``.
      positions: ``int[B, T]`` RoPE positions; default ``arange(T)`` per row
        (with ``cache``: ``cache.index + arange(T)``). The causal mask always
        follows the order along ``T`` (with ``cache``: the slot order).
      return_hidden: also return each block's output.
      cache: a :class:`KVCache` (from :meth:`init_cache`) holding the
        ``cache.index`` tokens before ``tokens``; they are appended at slots
        ``[index, index + T)``, so ``index + T <= cache.max_len`` (checked when
        ``index`` is concrete; under ``jit`` an overflowing write is clamped
        by ``dynamic_update_slice`` and the result is wrong). Works with a
        traced ``index``; shapes are static (attention spans all S_max slots).
      fresh_cache: promise that ``cache`` is empty (``index == 0``, checked
        when concrete): a prefill, attending causally over ``tokens`` only
        (query blocks of ``config.attn_query_chunk``) rather than all S_max
        slots. Same logits and cache, less work.

    Returns:
      ``logits: dtype[B, T, V]``; with ``return_hidden``, ``(logits, hiddens)``
      where ``hiddens`` is a list of ``n_layers`` arrays ``dtype[B, T, D]``, the
      residual stream after each block (before the final norm). With ``cache``
      the updated cache (``index`` advanced by ``T``) is appended:
      ``(logits, new_cache)`` or ``(logits, hiddens, new_cache)``.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if t > self.config.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
    if cache is not None:
      self._check_cache(cache, b, t)
    if fresh_cache and (cache is None or (not isinstance(cache.index, jax.core.Tracer)
                                          and int(cache.index) != 0)):
      raise ValueError("fresh_cache=True needs a cache with index 0 (from init_cache)")
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)
      if cache is not None:
        positions = positions + cache.index
      positions = jnp.broadcast_to(positions, (b, t))
    elif positions.shape != tokens.shape:
      raise ValueError(
          f"positions shape {positions.shape} must equal tokens shape {tokens.shape}")
    residual = ("act_batch", "act_seq", "act_embed")
    h = constrain(self.embed(tokens), *residual)
    if self.config.scan_layers:
      h, hiddens, cache = self._scan_blocks(h, positions, cache, fresh_cache, return_hidden)
    else:
      hiddens = []
      for i, block in enumerate(self.layers):
        if cache is None:
          h = block(h, positions)
        else:
          h, cache = block(h, positions, cache, i, fresh_cache)
        h = constrain(h, *residual)
        hiddens.append(h)
    logits = constrain(self.head(h), "act_batch", "act_seq", "act_vocab")
    if cache is None:
      return (logits, hiddens) if return_hidden else logits
    cache = dataclasses.replace(cache, index=cache.index + t)
    return (logits, hiddens, cache) if return_hidden else (logits, cache)

  def _scan_blocks(self, h: jax.Array, positions: jax.Array, cache: KVCache | None,
                   fresh_cache: bool, return_hidden: bool = False,
                   ) -> tuple[jax.Array, list[jax.Array], KVCache | None]:
    """The stacked blocks under ``jax.lax.scan``: the residual stream (and the cache, whose
    layer ``i`` block ``i`` writes) is the carry; with ``return_hidden`` each block's output is
    also stacked (only then: run eagerly, the scan would allocate ``n_layers`` activations).
    Functional (split once, merge one block per step) rather than ``nnx.scan``, so the model
    also runs inside ``jax.grad`` of a function that merged it."""
    residual = ("act_batch", "act_seq", "act_embed")
    graphdef, state = nnx.split(self.layers)

    def step(carry, xs):
      h, cache = carry
      block = nnx.merge(graphdef, xs[0])
      if cache is None:
        h = block(h, positions)
      else:
        h, cache = block(h, positions, cache, xs[1], fresh_cache)
      h = constrain(h, *residual)
      return (h, cache), (h if return_hidden else None)

    (h, cache), stacked = jax.lax.scan(step, (h, cache),
                                       (state, jnp.arange(self.config.n_layers)))
    return h, [] if stacked is None else list(stacked), cache

  def head(self, h: jax.Array) -> jax.Array:
    """Final norm and output head: residual stream ``[..., D]`` -> logits ``[..., V]``.

    Example::

      _, hiddens = model(tokens, return_hidden=True)
      last_logits = model.head(hiddens[-1][:, -1])     # only the last position
    """
    h = self.norm(h)
    if self.config.tie_embeddings:
      return self.embed.attend(h)
    return self.lm_head(h)

  def _check_cache(self, cache: KVCache, b: int, t: int) -> None:
    """Raises ValueError if ``cache`` cannot take ``t`` more tokens of ``b`` rows."""
    cfg = self.config
    want = (cfg.n_layers, b, cfg.n_kv_heads, cache.max_len, cfg.resolved_head_dim)
    if cache.k.shape != want or cache.v.shape != want:
      raise ValueError(
          f"cache k/v shapes {cache.k.shape}/{cache.v.shape} must be {want} "
          f"for tokens of shape {(b, t)}")
    if t > cache.max_len:
      raise ValueError(f"{t} tokens exceed the cache's max_len={cache.max_len}")
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > cache.max_len:
      raise ValueError(
          f"cache.index={int(cache.index)} + {t} tokens exceeds max_len={cache.max_len}")


def scan_layers(model: Llama) -> Llama:
  """The same model with its blocks stacked (``LlamaConfig.scan_layers=True``): every block
  parameter gains a leading ``"layers"`` axis; the embedding, norm and head are shared.

  Example::

    scanned = scan_layers(io.load_gguf(path))      # same logits, one block to compile
  """
  cfg = model.config
  if cfg.scan_layers:
    return model
  new = nnx.eval_shape(lambda: Llama(dataclasses.replace(cfg, scan_layers=True),
                                     rngs=nnx.Rngs(0)))
  is_var = lambda x: isinstance(x, nnx.Variable)
  states = [nnx.state(block) for block in model.layers]
  stacked = jax.tree.map(lambda like, *vs: like.replace(jnp.stack([v[...] for v in vs])),
                         nnx.state(new.layers), *states, is_leaf=is_var)
  nnx.update(new.layers, stacked)
  _share_ends(model, new)
  return new


def unroll_layers(model: Llama) -> Llama:
  """The inverse of `scan_layers`: a list of ``n_layers`` blocks again.

  Example::

    unrolled = unroll_layers(scanned)              # per-layer paths layers/0/...
  """
  cfg = model.config
  if not cfg.scan_layers:
    return model
  new = nnx.eval_shape(lambda: Llama(dataclasses.replace(cfg, scan_layers=False),
                                     rngs=nnx.Rngs(0)))
  is_var = lambda x: isinstance(x, nnx.Variable)
  stacked = nnx.state(model.layers)
  for i, block in enumerate(new.layers):
    nnx.update(block, jax.tree.map(lambda like, v, i=i: like.replace(v[...][i]),
                                   nnx.state(block), stacked, is_leaf=is_var))
  _share_ends(model, new)
  return new


def _share_ends(src: Llama, dst: Llama) -> None:
  """Copies the embedding, final norm and head (everything but the blocks) into ``dst``."""
  dst.embed, dst.norm = src.embed, src.norm
  if not src.config.tie_embeddings:
    dst.lm_head = src.lm_head


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


class _Structure:
  """A model's graph definition and its state's tree structure: the steps' static argument,
  hashed once. Each step then takes the state's leaves as a flat list, so a call costs no
  walk of the module state and no hash of the graph (at decode, with ~400 leaves, those
  took a few milliseconds a token: a fifth of a packed model's step)."""

  def __init__(self, graphdef: nnx.GraphDef, treedef: Any):
    self.graphdef, self.treedef = graphdef, treedef
    self._hash = hash((graphdef, treedef))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                             and (self.graphdef, self.treedef) == (other.graphdef, other.treedef))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill_step(structure: _Structure, leaves: list[jax.Array], tokens: jax.Array,
                  cache: KVCache) -> tuple[jax.Array, KVCache]:
  model = nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))
  _, hiddens, cache = model(tokens, cache=cache, return_hidden=True, fresh_cache=True)
  return model.head(hiddens[-1][:, -1]), cache  # the full [B, T, V] logits are never formed


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_step(structure: _Structure, leaves: list[jax.Array], token: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
  model = nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))
  logits, cache = model(token[:, None], cache=cache)
  return logits[:, 0], cache


def make_decode_fns(model: Llama) -> tuple[Any, Any]:
  """Jitted prefill and single-token decode steps of ``model`` (for timing them).

  The steps see a snapshot of ``model``'s state taken now (``nnx.split``);
  they are module-level ``jax.jit`` functions keyed on the graph definition,
  so models of the same structure share compilations (prefill compiles once
  per prompt shape). Each step donates the cache it is given: use only the
  cache it returns.

  Args:
    model: a :class:`Llama` (possibly rewritten, e.g. quantized).

  Returns:
    ``(prefill_fn, decode_fn)``:

    * ``prefill_fn(tokens: int[B, T], cache) -> (logits: dtype[B, V], cache)``,
      logits of the last token, for an empty cache (from :meth:`Llama.init_cache`;
      the prompt attends causally to itself only);
    * ``decode_fn(token: int[B], cache) -> (logits: dtype[B, V], cache)``.

  Example::

    prefill_fn, decode_fn = make_decode_fns(model)
    logits, cache = prefill_fn(prompt, model.init_cache(2, 64))
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = decode_fn(tok, cache)
    jax.block_until_ready(logits)
  """
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  structure = _Structure(graphdef, treedef)
  prefill_fn = functools.partial(_prefill_step, structure, leaves)
  decode_fn = functools.partial(_decode_step, structure, leaves)
  return prefill_fn, decode_fn


def sample_tokens(logits: jax.Array, key: jax.Array | None, *, temperature: float = 0.0,
                  top_p: float = 1.0) -> jax.Array:
  """Next tokens from ``logits [B, V]``: argmax when ``temperature == 0``, else a sample of
  ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
  probability reaches ``top_p`` (nucleus sampling; Holtzman et al., 2020).

  Returns:
    ``int32[B]``.

  Example::

    tok = sample_tokens(logits, jax.random.key(0), temperature=1.0, top_p=0.95)
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # the first token always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_jit_sample = jax.jit(sample_tokens, static_argnames=("temperature", "top_p"))


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def _jit_sample_suppressed(logits: jax.Array, key: jax.Array | None, banned: jax.Array, *,
                           temperature: float, top_p: float) -> jax.Array:
  """`sample_tokens` with the ``banned`` ids' logits set to -inf first."""
  return sample_tokens(logits.at[:, banned].set(-jnp.inf), key, temperature=temperature,
                       top_p=top_p)


def generate(model: Llama, prompt: jax.Array, max_new_tokens: int, *,
             max_len: int | None = None, temperature: float | Sequence[float] = 0.0,
             top_p: float = 1.0, key: jax.Array | None = None,
             suppress: Sequence[int] = ()) -> jax.Array:
  """Decoding with a KV cache: one jitted prefill, then one jitted step per new token; greedy
  by default, sampled with ``temperature`` > 0 (and nucleus ``top_p``) from ``key``
  (`sample_tokens`; the same key gives the same tokens).

  Args:
    model: a :class:`Llama`.
    prompt: ``int[B, T]`` token ids (all rows the same length, no padding).
    max_new_tokens: number of tokens to append (``>= 0``).
    max_len: cache length S_max, ``>= T + max_new_tokens`` and
      ``<= config.max_seq_len``; default ``T + max_new_tokens``.
    temperature: 0 for greedy decoding, else the softmax temperature of sampling; a
      sequence gives the temperature of each new token in turn, its last value holding for
      the rest (a temperature schedule).
    top_p: nucleus sampling's probability mass, in (0, 1].
    key: PRNG key, needed when ``temperature > 0``.
    suppress: token ids never produced (their logits set to -inf), e.g. a chat model's
      control tokens when sampling plain text.

  Returns:
    ``int32[B, T + max_new_tokens]``: the prompt followed by the new tokens.

  Example::

    out = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=8)  # int32[1, 11]
    sampled = generate(model, prompt, 64, temperature=1.0, top_p=0.95, key=jax.random.key(0))
    cooled = generate(model, prompt, 64, temperature=[2.0, 1.5, 1.0], key=jax.random.key(0))
  """
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {prompt.shape}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  temps = ([float(temperature)] if isinstance(temperature, (int, float))
           else [float(t) for t in temperature])
  if not temps or min(temps) < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature must be >= 0 (or a non-empty sequence of such) and top_p "
                     f"in (0, 1]; got {temperature}, {top_p}")
  if max(temps) > 0 and key is None:
    raise ValueError("generate: sampling (temperature > 0) needs a key")
  b, t = prompt.shape
  prompt = jnp.asarray(prompt, jnp.int32)
  max_len = t + max_new_tokens if max_len is None else max_len
  if max_len < t + max_new_tokens:
    raise ValueError(f"max_len={max_len} < prompt length {t} + max_new_tokens={max_new_tokens}")
  if max_len > model.config.max_seq_len:
    raise ValueError(f"max_len={max_len} exceeds max_seq_len={model.config.max_seq_len}")
  if max_new_tokens == 0:
    return prompt
  keys = (jax.random.split(key, max_new_tokens) if key is not None
          else [None] * max_new_tokens)
  sample = functools.partial(_jit_sample, top_p=top_p)
  if suppress:
    banned = sorted(set(int(i) for i in suppress))
    if banned[0] < 0 or banned[-1] >= model.config.vocab_size:
      raise ValueError(f"generate: suppress holds ids outside the vocabulary "
                       f"[0, {model.config.vocab_size}): {banned}")
    sample = functools.partial(_jit_sample_suppressed, banned=jnp.asarray(banned, jnp.int32),
                               top_p=top_p)
  pick = lambda logits, i: sample(logits, keys[i], temperature=temps[min(i, len(temps) - 1)])
  prefill_fn, decode_fn = make_decode_fns(model)
  logits, cache = prefill_fn(prompt, model.init_cache(b, max_len))
  out = [pick(logits, 0)]
  for i in range(1, max_new_tokens):
    logits, cache = decode_fn(out[-1], cache)
    out.append(pick(logits, i))
  return jnp.concatenate([prompt, jnp.stack(out, axis=1)], axis=1)
