"""Small NNX image classifiers: a CNN and a ViT (Fashion-MNIST sized by default).

Both map ``images: [B, H, W, C]`` (NHWC) to ``logits: dtype[B, num_classes]``;
the defaults are ``28 x 28 x 1`` with 10 classes, and any H, W, C and class
count can be configured. Every layer a compression rule may target is a plain
``nnx.Conv`` / ``nnx.Linear`` called normally (the ViT is all ``nnx.Linear``:
its patch embedding is a Linear over flattened ``p x p x C`` patches, which
equals a stride-``p`` convolution).

Logical axis names (``out_sharding`` metadata on every param)::

  path                           param: shape              logical axes
  CNN conv{1,2}                  kernel [k, k, Cin, Cout]  (None, None, "conv_in", "conv_out")
                                 bias [Cout]               ("conv_out",)
  CNN fc1                        kernel [(H/4)(W/4)C2, Hd] ("embed", "mlp");  bias ("mlp",)
  CNN fc2                        kernel [Hd, classes]      ("mlp", "classes"); bias ("classes",)
  ViT patch_embed                kernel [p*p*C, D]         (None, "embed"); bias ("embed",)
  ViT cls_token (pool="cls")     [D]                       ("embed",)
  ViT pos_embed                  [N (+1 with cls), D]      (None, "embed")
  ViT layers/{i}/attn/q_proj     kernel [D, D], bias [D]   ("embed", "q_heads"), ("q_heads",)
  ViT layers/{i}/attn/k_proj     kernel [D, D], bias [D]   ("embed", "kv_heads"), ("kv_heads",)
  ViT layers/{i}/attn/v_proj     kernel [D, D], bias [D]   ("embed", "kv_heads"), ("kv_heads",)
  ViT layers/{i}/attn/o_proj     kernel [D, D], bias [D]   ("q_heads", "embed"), ("embed",)
  ViT layers/{i}/mlp/up_proj     kernel [D, F], bias [F]   ("embed", "mlp"), ("mlp",)
  ViT layers/{i}/mlp/down_proj   kernel [F, D], bias [D]   ("mlp", "embed"), ("embed",)
  ViT {attn_,mlp_,}norm          scale [D], bias [D]       ("norm",), ("norm",)
  ViT head                       kernel [D, classes]       ("embed", "classes"); bias ("classes",)

Example::

  from flax import nnx
  import jax.numpy as jnp
  cnn = CNN(CNNConfig(), rngs=nnx.Rngs(0))            # ~106k params
  vit = ViT(ViTConfig.tiny(), rngs=nnx.Rngs(0))
  logits = cnn(jnp.zeros((8, 28, 28, 1)))              # float32[8, 10]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
from flax import nnx
import jax
import jax.numpy as jnp

from jaxcomp.models.partitioning import axes

# Every logical axis name a vision-model parameter uses.
VISION_LOGICAL_AXES = ("conv_in", "conv_out", "embed", "q_heads", "kv_heads",
                       "mlp", "norm", "classes")

POOLINGS = ("cls", "mean")


def _check_positive(owner: str, **values: Any) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _check_image_size(owner: str, image_size: Any) -> None:
  if (not isinstance(image_size, tuple) or len(image_size) != 2
      or not all(isinstance(s, int) and s > 0 for s in image_size)):
    raise ValueError(
        f"{owner}.image_size must be a (height, width) tuple of positive ints, "
        f"got {image_size!r}")


def _check_dtypes(owner: str, **values: Any) -> None:
  for name, value in values.items():
    try:
      ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{owner}.{name} must be a floating dtype, got {value!r}")


# --------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNConfig:
  """Hyperparameters of :class:`CNN`, validated at construction.

  Example::

    cfg = CNNConfig(image_size=(32, 32), in_channels=3, num_classes=100)
  """

  image_size: tuple[int, int] = (28, 28)  # (H, W); each >= 4.
  in_channels: int = 1  # C.
  num_classes: int = 10  # width of the logits.
  features: tuple[int, int] = (16, 32)  # output channels of conv1, conv2.
  hidden_dim: int = 64  # width of fc1.
  kernel_size: int = 3  # square conv window.
  dtype: Any = jnp.float32  # compute dtype.
  param_dtype: Any = jnp.float32  # storage dtype of the parameters.

  def __post_init__(self):
    _check_image_size("CNNConfig", self.image_size)
    if min(self.image_size) < 4:
      raise ValueError(f"CNNConfig.image_size must be at least 4x4, got {self.image_size}")
    if (not isinstance(self.features, tuple) or len(self.features) != 2
        or not all(isinstance(f, int) and f > 0 for f in self.features)):
      raise ValueError(
          f"CNNConfig.features must be a pair of positive ints, got {self.features!r}")
    _check_positive("CNNConfig", in_channels=self.in_channels,
                    num_classes=self.num_classes, hidden_dim=self.hidden_dim,
                    kernel_size=self.kernel_size)
    _check_dtypes("CNNConfig", dtype=self.dtype, param_dtype=self.param_dtype)

  @classmethod
  def tiny(cls, **overrides: Any) -> CNNConfig:
    """A ~27k-param CNN (features 8/16, hidden 32) for fast tests."""
    return cls(**{**dict(features=(8, 16), hidden_dim=32), **overrides})


class CNN(nnx.Module):
  """Two conv + max-pool stages, then a two-layer MLP head.

  Shapes: ``[B, H, W, C] -> conv1 (SAME) + relu + pool/2 -> conv2 + relu +
  pool/2 -> flatten [B, (H//4)*(W//4)*C2] -> fc1 + relu -> fc2 -> [B, classes]``.
  The default config has 105,866 params.

  Example::

    logits = CNN(CNNConfig(), rngs=nnx.Rngs(0))(jnp.zeros((8, 28, 28, 1)))
  """

  def __init__(self, config: CNNConfig, *, rngs: nnx.Rngs):
    self.config = config
    c1, c2 = config.features
    k = (config.kernel_size, config.kernel_size)
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.conv1 = nnx.Conv(config.in_channels, c1, k, padding="SAME",
                          kernel_metadata=axes(None, None, "conv_in", "conv_out"),
                          bias_metadata=axes("conv_out"), **common)
    self.conv2 = nnx.Conv(c1, c2, k, padding="SAME",
                          kernel_metadata=axes(None, None, "conv_in", "conv_out"),
                          bias_metadata=axes("conv_out"), **common)
    h, w = config.image_size
    flat = (h // 4) * (w // 4) * c2
    self.fc1 = nnx.Linear(flat, config.hidden_dim,
                          kernel_metadata=axes("embed", "mlp"),
                          bias_metadata=axes("mlp"), **common)
    self.fc2 = nnx.Linear(config.hidden_dim, config.num_classes,
                          kernel_metadata=axes("mlp", "classes"),
                          bias_metadata=axes("classes"), **common)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Classifies ``images: [B, H, W, C]`` into ``logits: [B, num_classes]``."""
    x = nnx.max_pool(jax.nn.relu(self.conv1(images)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = einops.rearrange(x, "b h w c -> b (h w c)")
    return self.fc2(jax.nn.relu(self.fc1(x)))


# --------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
  """Hyperparameters of :class:`ViT`, validated at construction.

  Example::

    cfg = ViTConfig(image_size=(32, 32), in_channels=3, patch_size=4)
  """

  image_size: tuple[int, int] = (28, 28)  # (H, W); divisible by patch_size.
  in_channels: int = 1  # C.
  num_classes: int = 10  # width of the logits.
  patch_size: int = 4  # square patch side p; N = (H/p) * (W/p) patches.
  dim: int = 64  # D: token width.
  n_layers: int = 4  # encoder blocks.
  n_heads: int = 4  # attention heads; divides dim.
  mlp_dim: int = 128  # F: hidden width of the GELU MLP.
  pool: str = "cls"  # "cls" (class token) or "mean" (mean over patches).
  norm_eps: float = 1e-6  # LayerNorm epsilon.
  dtype: Any = jnp.float32  # compute dtype.
  param_dtype: Any = jnp.float32  # storage dtype of the parameters.

  def __post_init__(self):
    _check_image_size("ViTConfig", self.image_size)
    _check_positive("ViTConfig", in_channels=self.in_channels,
                    num_classes=self.num_classes, patch_size=self.patch_size,
                    dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                    mlp_dim=self.mlp_dim)
    if any(s % self.patch_size for s in self.image_size):
      raise ValueError(
          f"ViTConfig.patch_size={self.patch_size} must divide "
          f"image_size={self.image_size}")
    if self.dim % self.n_heads:
      raise ValueError(
          f"ViTConfig.n_heads={self.n_heads} must divide dim={self.dim}")
    if self.pool not in POOLINGS:
      raise ValueError(f"ViTConfig.pool must be one of {POOLINGS}, got {self.pool!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"ViTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
    _check_dtypes("ViTConfig", dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def num_patches(self) -> int:
    """N: number of patch tokens, ``(H / p) * (W / p)``."""
    h, w = self.image_size
    return (h // self.patch_size) * (w // self.patch_size)

  @classmethod
  def tiny(cls, **overrides: Any) -> ViTConfig:
    """A 2-layer, 32-wide ViT on 7x7 patches (16 tokens) for fast tests."""
    fields = dict(patch_size=7, dim=32, n_layers=2, n_heads=2, mlp_dim=64)
    return cls(**{**fields, **overrides})


def _dense(config: ViTConfig, d_in: int, d_out: int, names: tuple[str, str],
           rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=config.dtype,
                    param_dtype=config.param_dtype,
                    kernel_metadata=axes(*names), bias_metadata=axes(names[1]),
                    rngs=rngs)


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.dim, epsilon=config.norm_eps, dtype=config.dtype,
                       param_dtype=config.param_dtype,
                       scale_metadata=axes("norm"), bias_metadata=axes("norm"),
                       rngs=rngs)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention, ``[B, N, D] -> [B, N, D]``.

  Separate q/k/v/o ``nnx.Linear`` projections (with bias); scores and softmax
  in float32.

  Example::

    y = SelfAttention(ViTConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 17, 32)))
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    d = config.dim
    self.q_proj = _dense(config, d, d, ("embed", "q_heads"), rngs)
    self.k_proj = _dense(config, d, d, ("embed", "kv_heads"), rngs)
    self.v_proj = _dense(config, d, d, ("embed", "kv_heads"), rngs)
    self.o_proj = _dense(config, d, d, ("q_heads", "embed"), rngs)
    self.n_heads = config.n_heads

  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends every token to every token."""
    split = lambda y: einops.rearrange(y, "b n (h d) -> b n h d", h=self.n_heads)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k,
                        preferred_element_type=jnp.float32) * q.shape[-1]**-0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", probs, v)
    return self.o_proj(einops.rearrange(out, "b n h d -> b n (h d)"))


class FeedForward(nnx.Module):
  """GELU MLP ``down_proj(gelu(up_proj(x)))``, ``[..., D] -> [..., D]``.

  Example::

    y = FeedForward(ViTConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 17, 32)))
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.up_proj = _dense(config, config.dim, config.mlp_dim, ("embed", "mlp"), rngs)
    self.down_proj = _dense(config, config.mlp_dim, config.dim, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the MLP position-wise."""
    return self.down_proj(jax.nn.gelu(self.up_proj(x)))


class EncoderBlock(nnx.Module):
  """Pre-norm transformer encoder block, ``[B, N, D] -> [B, N, D]``.

  Example::

    y = EncoderBlock(ViTConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 17, 32)))
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _layer_norm(config, rngs)
    self.attn = SelfAttention(config, rngs=rngs)
    self.mlp_norm = _layer_norm(config, rngs)
    self.mlp = FeedForward(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Adds attention then MLP to the residual stream ``x``."""
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class ViT(nnx.Module):
  """Vision Transformer classifier.

  Shapes: ``[B, H, W, C] -> patches [B, N, p*p*C] -> patch_embed -> [B, N, D]
  (+ class token) + pos_embed -> n_layers x EncoderBlock -> norm -> pool
  (class token or mean) -> head -> [B, num_classes]``.

  Example::

    logits = ViT(ViTConfig(), rngs=nnx.Rngs(0))(jnp.zeros((8, 28, 28, 1)))

  Reference: Dosovitskiy et al., https://arxiv.org/abs/2010.11929.
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    p, d = config.patch_size, config.dim
    self.patch_embed = nnx.Linear(
        p * p * config.in_channels, d, dtype=config.dtype,
        param_dtype=config.param_dtype, kernel_metadata=axes(None, "embed"),
        bias_metadata=axes("embed"), rngs=rngs)
    init = nnx.initializers.normal(stddev=0.02)
    n_tokens = config.num_patches
    if config.pool == "cls":
      self.cls_token = nnx.Param(jnp.zeros((d,), config.param_dtype), **axes("embed"))
      n_tokens += 1
    self.pos_embed = nnx.Param(
        init(rngs.params(), (n_tokens, d), config.param_dtype), **axes(None, "embed"))
    self.layers = nnx.List(
        [EncoderBlock(config, rngs=rngs) for _ in range(config.n_layers)])
    self.norm = _layer_norm(config, rngs)
    self.head = _dense(config, d, config.num_classes, ("embed", "classes"), rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Classifies ``images: [B, H, W, C]`` into ``logits: [B, num_classes]``."""
    p = self.config.patch_size
    patches = einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)",
                               p1=p, p2=p)
    x = self.patch_embed(patches)
    if self.config.pool == "cls":
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype),
                             (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed[...].astype(x.dtype)
    for block in self.layers:
      x = block(x)
    x = self.norm(x)
    pooled = x[:, 0] if self.config.pool == "cls" else jnp.mean(x, axis=1)
    return self.head(pooled)
