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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import einops
from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.models._axes import axes

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
  dtype: Any = jnp.float32  # compute dtype (activations, logits).
  param_dtype: Any = jnp.float32  # storage dtype of the parameters.

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

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Attends each token to itself and the tokens before it."""
    hd, kv = self.head_dim, self.n_kv_heads
    rope = functools.partial(apply_rope, positions=positions,
                             theta=self.rope_theta, style=self.rope_style)
    q = rope(einops.rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=hd))
    k = rope(einops.rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=hd))
    v = einops.rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=hd)
    q = einops.rearrange(q, "b t (k g) d -> b t k g d", k=kv)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) * hd**-0.5
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return self.o_proj(einops.rearrange(out, "b t k g d -> b t (k g d)"))


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

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the gated MLP position-wise."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Adds attention then MLP to the residual stream ``x``."""
    h = x + self.attn(self.attn_norm(x), positions)
    return h + self.mlp(self.mlp_norm(h))


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
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=config.dtype,
                           param_dtype=config.param_dtype, embedding_init=_INIT,
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=config.dtype,
                        param_dtype=config.param_dtype)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, config.dim, config.vocab_size,
                             ("embed", "vocab"), rngs)

  def __call__(
      self, tokens: jax.Array, *, positions: jax.Array | None = None,
      return_hidden: bool = False,
  ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Computes next-token logits.

    Args:
      tokens: ``int[B, T]`` token ids, ``T <= config.max_seq_len``.
      positions: ``int[B, T]`` RoPE positions; default ``arange(T)`` per row.
        The causal mask always follows the order along ``T``.
      return_hidden: also return each block's output.

    Returns:
      ``logits: dtype[B, T, V]``; with ``return_hidden``, ``(logits, hiddens)``
      where ``hiddens`` is a list of ``n_layers`` arrays ``dtype[B, T, D]``, the
      residual stream after each block (before the final norm).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if t > self.config.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    elif positions.shape != tokens.shape:
      raise ValueError(
          f"positions shape {positions.shape} must equal tokens shape {tokens.shape}")
    h = self.embed(tokens)
    hiddens = []
    for block in self.layers:
      h = block(h, positions)
      hiddens.append(h)
    h = self.norm(h)
    if self.config.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    return (logits, hiddens) if return_hidden else logits
