"""Structured pruning of a Llama that really shrinks it: fewer FFN channels, heads, or blocks.

Pruning FFN channel ``j`` removes column ``j`` of ``gate_proj`` / ``up_proj`` and row ``j`` of
``down_proj``; pruning query head ``h`` removes its ``head_dim`` columns of ``q_proj`` and rows
of ``o_proj``. Every block keeps the same number of channels and, in every key/value group, the
same number of query heads, so the result is a `Llama` whose config has a smaller ``ffn_dim``
/ ``n_heads`` and whose arrays are smaller, not zero-filled. Its logits equal those of the
*masked* model (`mask_llama`: the same weights zeroed in place; for a head, its ``o_proj``
rows, since a head with zero queries still averages its values).

Scores (`llama_structured_scores`) are magnitudes by default -- an FFN channel's
``||gate_j||^2 + ||up_j||^2 + ||down_j||^2``, a head's ``||q_h||^2 + ||o_h||^2`` -- and any
``[n_layers, F]`` / ``[n_layers, H]`` arrays may be passed instead (e.g. activation-based).

Example::

  keep = llama_structured_keep(model, ffn_sparsity=0.25, head_sparsity=1 / 3)
  small = shrink_llama(model, keep)          # ffn_dim 1536 -> 1152, 9 -> 6 heads
  masked = mask_llama(model, keep)           # same logits, original shapes
  shallow = drop_blocks(model, range(15, 30))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.models.llama import Llama, scan_layers, unroll_layers
from jaxcomp.quant import hadamard
from jaxcomp.sparse import masks as masks_lib

Array = jax.Array

__all__ = ["StructuredKeep", "drop_blocks", "llama_structured_keep", "llama_structured_scores",
           "mask_llama", "rotate_llama", "shrink_llama"]


class StructuredKeep(NamedTuple):
  """Which FFN channels and query heads each block keeps (sorted indices)."""

  ffn: np.ndarray  # int [n_layers, F_keep]
  heads: np.ndarray  # int [n_layers, H_keep]


def _check(model: Any) -> None:
  if not isinstance(model, Llama):
    raise TypeError(f"expected a jaxcomp.models.Llama, got {type(model).__name__}")


def _per_block(fn):
  """Runs ``fn`` on the unrolled form of a scanned Llama (`LlamaConfig.scan_layers`) and
  stacks a returned model back (a one-line error when its blocks no longer share shapes)."""

  @functools.wraps(fn)
  def wrapped(model, *args, **kwargs):
    if not (isinstance(model, Llama) and model.config.scan_layers):
      return fn(model, *args, **kwargs)
    out = fn(unroll_layers(model), *args, **kwargs)
    if not isinstance(out, Llama):
      return out
    shapes = {tuple(x.shape for x in jax.tree.leaves(nnx.state(b))) for b in out.layers}
    if len(shapes) > 1:
      raise ValueError(f"{fn.__name__}: the blocks now differ in shape (e.g. heads or FFN "
                       "channels removed unevenly), so the model cannot be scanned again; "
                       "unroll_layers the model first to keep it unrolled")
    return scan_layers(out)

  return wrapped


@_per_block
def llama_structured_scores(model: Llama) -> tuple[Array, Array]:
  """Magnitude scores: FFN channels ``[n_layers, F]`` and query heads ``[n_layers, H]``.

  Example::

    ffn_scores, head_scores = llama_structured_scores(model)
  """
  _check(model)
  cfg = model.config
  hd = cfg.resolved_head_dim
  ffn, heads = [], []
  for block in model.layers:
    sq = lambda a: jnp.square(a[...].astype(jnp.float32))
    ffn.append(sq(block.mlp.gate_proj.kernel).sum(0) + sq(block.mlp.up_proj.kernel).sum(0)
               + sq(block.mlp.down_proj.kernel).sum(1))
    q = sq(block.attn.q_proj.kernel).sum(0).reshape(cfg.n_heads, hd).sum(1)
    o = sq(block.attn.o_proj.kernel).sum(1).reshape(cfg.n_heads, hd).sum(1)
    heads.append(q + o)
  return jnp.stack(ffn), jnp.stack(heads)


@_per_block
def llama_structured_keep(model: Llama, *, ffn_sparsity: float = 0.0,
                          head_sparsity: float = 0.0,
                          scores: tuple[Array, Array] | None = None) -> StructuredKeep:
  """Picks the FFN channels and query heads to keep in every block.

  Each block prunes ``round(ffn_sparsity * F)`` channels and, in each of its ``KV`` key/value
  groups, ``round(head_sparsity * G)`` of the group's ``G = H / KV`` query heads (so the
  shrunk model stays GQA-regular), the lowest-scoring ones.

  Args:
    model: a `Llama`.
    ffn_sparsity: fraction of FFN channels to prune per block, in ``[0, 1)``.
    head_sparsity: fraction of query heads to prune per key/value group, in ``[0, 1)``.
    scores: ``(ffn [n_layers, F], heads [n_layers, H])``; default `llama_structured_scores`.

  Returns:
    `StructuredKeep`.

  Example::

    keep = llama_structured_keep(model, ffn_sparsity=0.5)
  """
  _check(model)
  cfg = model.config
  ffn_scores, head_scores = llama_structured_scores(model) if scores is None else scores
  want = ((cfg.n_layers, cfg.ffn_dim), (cfg.n_layers, cfg.n_heads))
  if (tuple(np.shape(ffn_scores)), tuple(np.shape(head_scores))) != want:
    raise ValueError(f"scores shapes {np.shape(ffn_scores)}, {np.shape(head_scores)} must be "
                     f"{want[0]}, {want[1]}")
  g = cfg.n_heads // cfg.n_kv_heads
  ffn_keep = np.asarray(masks_lib.unstructured_mask(jnp.asarray(ffn_scores), ffn_sparsity,
                                                    axis=1))
  grouped = jnp.asarray(head_scores).reshape(cfg.n_layers, cfg.n_kv_heads, g)
  head_keep = np.asarray(masks_lib.unstructured_mask(grouped, head_sparsity, axis=2))
  if not head_keep.any(axis=2).all():
    raise ValueError(f"head_sparsity={head_sparsity} would prune every query head of a group")
  as_indices = lambda keep: np.stack([np.flatnonzero(row) for row in keep])
  return StructuredKeep(as_indices(ffn_keep), as_indices(head_keep.reshape(cfg.n_layers, -1)))


def _head_columns(heads: np.ndarray, hd: int) -> np.ndarray:
  return (heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)


@_per_block
def mask_llama(model: Llama, keep: StructuredKeep) -> Llama:
  """A copy of ``model`` with the pruned channels' / heads' weights zeroed (same shapes).

  Example::

    masked = mask_llama(model, llama_structured_keep(model, ffn_sparsity=0.5))
  """
  _check(model)
  new = nnx.clone(model)
  cfg = model.config
  hd = cfg.resolved_head_dim
  for i, block in enumerate(new.layers):
    f = np.zeros(cfg.ffn_dim, bool)
    f[keep.ffn[i]] = True
    h = np.zeros(cfg.n_heads * hd, bool)
    h[_head_columns(keep.heads[i], hd)] = True
    for lin, axis, m in ((block.mlp.gate_proj, 1, f), (block.mlp.up_proj, 1, f),
                         (block.mlp.down_proj, 0, f), (block.attn.q_proj, 1, h),
                         (block.attn.o_proj, 0, h)):
      w = lin.kernel[...]
      shape = (1, -1) if axis == 1 else (-1, 1)
      lin.kernel[...] = jnp.where(m.reshape(shape), w, jnp.zeros((), w.dtype))
  return new


@_per_block
def shrink_llama(model: Llama, keep: StructuredKeep) -> Llama:
  """A smaller `Llama` holding only the kept FFN channels and query heads.

  Its config has ``ffn_dim = len(keep.ffn[0])`` and ``n_heads = len(keep.heads[0])`` (head_dim
  unchanged); its logits equal ``mask_llama(model, keep)``'s.

  Example::

    small = shrink_llama(model, llama_structured_keep(model, head_sparsity=1 / 3))
  """
  _check(model)
  cfg = model.config
  hd = cfg.resolved_head_dim
  new_cfg = dataclasses.replace(cfg, ffn_dim=int(keep.ffn.shape[1]),
                                n_heads=int(keep.heads.shape[1]), head_dim=hd)
  state = nnx.to_pure_dict(nnx.state(model))
  for i in range(cfg.n_layers):
    layer = state["layers"][i]
    cols = _head_columns(keep.heads[i], hd)
    f = keep.ffn[i]
    layer["mlp"]["gate_proj"]["kernel"] = layer["mlp"]["gate_proj"]["kernel"][:, f]
    layer["mlp"]["up_proj"]["kernel"] = layer["mlp"]["up_proj"]["kernel"][:, f]
    layer["mlp"]["down_proj"]["kernel"] = layer["mlp"]["down_proj"]["kernel"][f, :]
    layer["attn"]["q_proj"]["kernel"] = layer["attn"]["q_proj"]["kernel"][:, cols]
    layer["attn"]["o_proj"]["kernel"] = layer["attn"]["o_proj"]["kernel"][cols, :]
  new = nnx.eval_shape(lambda: Llama(new_cfg, rngs=nnx.Rngs(0)))
  new_state = nnx.state(new)
  nnx.replace_by_pure_dict(new_state, state)
  nnx.update(new, new_state)
  return new


@_per_block
def drop_blocks(model: Llama, drop: Iterable[int]) -> Llama:
  """A shallower `Llama` without the blocks ``drop`` (depth pruning); the rest keep their order.

  Example::

    shallow = drop_blocks(model, range(15, 30))   # SmolLM2: 30 -> 15 blocks
  """
  _check(model)
  cfg = model.config
  drop = sorted(set(int(i) for i in drop))
  if any(not 0 <= i < cfg.n_layers for i in drop):
    raise ValueError(f"drop_blocks: block indices must be in [0, {cfg.n_layers}), got {drop}")
  kept = [i for i in range(cfg.n_layers) if i not in drop]
  if not kept:
    raise ValueError("drop_blocks: cannot drop every block")
  state = nnx.to_pure_dict(nnx.state(model))
  state["layers"] = {j: state["layers"][i] for j, i in enumerate(kept)}
  new = nnx.eval_shape(lambda: Llama(dataclasses.replace(cfg, n_layers=len(kept)),
                                     rngs=nnx.Rngs(0)))
  new_state = nnx.state(new)
  nnx.replace_by_pure_dict(new_state, state)
  nnx.update(new, new_state)
  return new


@_per_block
def rotate_llama(model: Llama, key: Array, *, online: bool = True, heads: bool = True) -> Llama:
  """QuaRot's rotations folded into a Llama: the same function, outliers spread out.

  1. Every RMSNorm scale is folded into the weights that read it (q/k/v, gate/up, the head),
     leaving scales of 1, so that a norm commutes with an orthogonal ``Q`` (``rms(x Q) =
     rms(x)``).
  2. The residual stream is rotated by a randomized Hadamard ``Q`` (`hadamard.random_hadamard`,
     from ``key``): embedding ``E Q``; every weight reading the stream ``Q^T W``; every weight
     writing it (o_proj, down_proj) ``W Q``; the head ``Q^T diag(g) E^T``. A tied head is
     untied (``tie_embeddings=False``), since the embedding and the head now differ.
  3. ``heads``: each value head is rotated by a Hadamard of ``head_dim`` (v_proj's columns),
     and o_proj's rows undo it per query head (attention is linear in the values).
  4. ``online``: the MLP's hidden activation is transformed by `hadamard.fwht` at run time
     (``LlamaConfig.ffn_hadamard``), and down_proj's kernel holds the inverse. This is what
     cannot be folded (SiLU and the gate sit between up_proj and down_proj).

  Logits equal the input model's up to float32 rounding (tests/models/test_rotate.py). Apply
  before quantizing (PTQ or QAT) so that activations as well as weights are quantized in the
  rotated basis (W4A8, W4A4).

  Args:
    model: a float `Llama` (a scanned one is rotated block by block and stacked back).
    key: PRNG key of the random signs.
    online: add the online Hadamard before down_proj.
    heads: rotate the value / output heads.

  Returns:
    A new `Llama` (the input is untouched).

  Example::

    rotated = rotate_llama(model, jax.random.key(0))
    w4a8 = jc.ptq(rotated, gptq_w4a8_recipe, calib=tokens)
  """
  _check(model)
  cfg = model.config
  d, hd = cfg.dim, cfg.resolved_head_dim
  f64 = lambda x: np.asarray(x, np.float64)
  state = nnx.to_pure_dict(nnx.state(model))
  q = f64(hadamard.random_hadamard(d, key))
  q = q / np.linalg.norm(q, axis=1, keepdims=True)  # exactly orthonormal rows in float64
  h_head = hadamard.hadamard_matrix(hd) / np.sqrt(hd)
  h_ffn = hadamard.hadamard_matrix(cfg.ffn_dim) / np.sqrt(cfg.ffn_dim)
  embed = f64(state["embed"]["embedding"])
  head = embed.T if cfg.tie_embeddings else f64(state["lm_head"]["kernel"])
  head = f64(state["norm"]["scale"])[:, None] * head
  out = {"embed": {"embedding": embed @ q}, "lm_head": {"kernel": q.T @ head},
         "norm": {"scale": np.ones(d)}, "layers": {}}
  for i, layer in state["layers"].items():
    attn, mlp = layer["attn"], layer["mlp"]
    g_attn, g_mlp = f64(layer["attn_norm"]["scale"]), f64(layer["mlp_norm"]["scale"])
    read = lambda w, g: q.T @ (g[:, None] * f64(w))
    wv = read(attn["v_proj"]["kernel"], g_attn)
    wo = f64(attn["o_proj"]["kernel"])
    if heads:
      wv = (wv.reshape(d, -1, hd) @ h_head).reshape(d, -1)
      wo = np.einsum("ji,hjd->hid", h_head, wo.reshape(-1, hd, d)).reshape(-1, d)
    wd = f64(mlp["down_proj"]["kernel"])
    if online:
      wd = h_ffn.T @ wd
    out["layers"][i] = {
        "attn_norm": {"scale": np.ones(d)}, "mlp_norm": {"scale": np.ones(d)},
        "attn": {"q_proj": {"kernel": read(attn["q_proj"]["kernel"], g_attn)},
                 "k_proj": {"kernel": read(attn["k_proj"]["kernel"], g_attn)},
                 "v_proj": {"kernel": wv}, "o_proj": {"kernel": wo @ q}},
        "mlp": {"gate_proj": {"kernel": read(mlp["gate_proj"]["kernel"], g_mlp)},
                "up_proj": {"kernel": read(mlp["up_proj"]["kernel"], g_mlp)},
                "down_proj": {"kernel": wd @ q}}}
  new_cfg = dataclasses.replace(cfg, tie_embeddings=False, ffn_hadamard=online)
  new = nnx.eval_shape(lambda: Llama(new_cfg, rngs=nnx.Rngs(0)))
  new_state = nnx.state(new)
  dtype = cfg.param_dtype
  nnx.replace_by_pure_dict(new_state, jax.tree.map(lambda x: jnp.asarray(x, dtype), out))
  nnx.update(new, new_state)
  return new
