"""Tiny Linen models written the way other codebases write them, shared by the Linen tests.

* `ScanLM`: MaxText style: every kernel boxed by ``nn.with_logical_partitioning``, the blocks
  stacked by ``nn.scan`` (``variable_axes={"params": scan_axis}``, the stack axis named
  ``"layers"`` through ``metadata_params``) around ``nn.remat``.
* `LoopLM`: the same blocks as a Python loop (``layers_0``, ``layers_1``, ...): the per-layer
  reference; `unstack_params` turns a `ScanLM`'s params into its params.
* `VmapEnsemble`: ``nn.vmap`` over copies of a Dense (one input slice each).
* `VisionNet`: Conv and ``nn.MultiHeadDotProductAttention`` over patches.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

DEPTH, D, F, V = 3, 16, 32, 50
init = nn.initializers.lecun_normal()


def _boxed(names, fn=init):
  return nn.with_logical_partitioning(fn, names)


class Block(nn.Module):
  """RMSNorm, an up projection, a (heads, kv) DenseGeneral and an Einsum merge."""

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.RMSNorm(name="norm", scale_init=_boxed(("embed",), nn.initializers.ones))(x)
    h = jax.nn.gelu(nn.Dense(F, name="up", kernel_init=_boxed(("embed", "mlp")))(h))
    h = nn.DenseGeneral((2, 8), name="heads", kernel_init=_boxed(("mlp", "heads", "kv")))(h)
    h = nn.Einsum((2, 8, D), "bthk,hkd->btd", name="merge",
                  kernel_init=_boxed(("heads", "kv", "embed")))(h)
    return x + h, None


def _embed():
  return nn.Embed(V, D, name="embed", embedding_init=_boxed(("vocab", "embed"),
                                                            nn.initializers.normal(1.0)))


def _head():
  return nn.Dense(V, name="head", kernel_init=_boxed(("embed", "vocab")))


class ScanLM(nn.Module):
  remat: bool = True
  scan_axis: int = 0

  @nn.compact
  def __call__(self, tokens):
    block = nn.remat(Block) if self.remat else Block
    stack = nn.scan(block, variable_axes={"params": self.scan_axis},
                    split_rngs={"params": True}, length=DEPTH,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="layers")(_embed()(tokens), None)
    return _head()(x)


class LoopLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = _embed()(tokens)
    for i in range(DEPTH):
      x, _ = Block(name=f"layers_{i}")(x)
    return _head()(x)


def unstack_params(variables, scan_axis=0):
  """`ScanLM` variables -> `LoopLM` variables (same weights, boxes with the layer axis dropped)."""
  params = dict(variables["params"])
  stacked = params.pop("layers")

  def take(box, i):
    if isinstance(box, meta.Partitioned):
      names = box.names[:scan_axis] + box.names[scan_axis + 1:]
      return box.replace(value=jnp.take(box.value, i, axis=scan_axis), names=names)
    return jnp.take(box, i, axis=scan_axis)

  is_box = lambda x: isinstance(x, meta.Partitioned)
  for i in range(DEPTH):
    params[f"layers_{i}"] = jax.tree.map(lambda b, i=i: take(b, i), stacked, is_leaf=is_box)
  return {"params": params}


class VmapEnsemble(nn.Module):
  """Three Dense copies, each on its own slice of the input's leading axis."""

  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=0, out_axes=0)
    return dense(8, name="experts")(x)


class VisionNet(nn.Module):
  """Conv stem, attention over the patches, a classifier."""

  @nn.compact
  def __call__(self, images):
    h = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="stem")(images))
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
    return nn.Dense(10, name="classifier")(h.mean(axis=1))
