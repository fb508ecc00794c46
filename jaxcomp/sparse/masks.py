"""Pruning masks on plain arrays: unstructured, N:M, block and structured (no Flax).

Every function takes *scores* (larger = more important: ``|w|``, Wanda's ``|w| * ||x||``, ...)
and returns a boolean mask, ``True`` where the weight is kept. Counts are exact: a target
sparsity ``p`` prunes ``round(p * n)`` of the ``n`` candidates (elements, groups, blocks,
channels), ties broken by position (the earlier one is pruned first), so the result never
depends on floating-point threshold luck. ``p`` must lie in ``[0, 1)``; it may also be a traced
scalar (a sparsity schedule inside ``jit``), then unchecked.

Layout convention: a kernel is ``(K, N)`` for ``y = x @ w`` (Flax's Linear), the *input* axis is
0. N:M sparsity runs along the input axis (the contracting one, as sparse tensor cores need);
"per output" comparisons (Wanda's) rank each column's K weights among themselves.

Example::

  w = jax.random.normal(jax.random.key(0), (64, 32))
  m = nm_mask(jnp.abs(w), 2, 4)                 # 2 of every 4 consecutive inputs kept
  m = unstructured_mask(jnp.abs(w), 0.5)        # exactly 1024 of 2048 kept
  m = block_mask(jnp.abs(w), 0.75, (8, 16))     # whole 8x16 tiles pruned
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "apply_mask",
    "block_mask",
    "global_masks",
    "nm_mask",
    "sparsity",
    "structured_keep",
    "structured_mask",
    "unstructured_mask",
]


def _check_sparsity(p: Any, name: str = "sparsity") -> Any:
  """A Python number is checked to lie in [0, 1); a traced / array scalar (a schedule inside
  ``jit``) is passed through unchecked."""
  if isinstance(p, (jax.Array, np.ndarray)) and jnp.ndim(p) == 0 and not isinstance(p, bool):
    return p
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
  return float(p)


def _n_pruned(p: Any, n: int) -> Any:
  if isinstance(p, float):
    return int(round(p * n))
  return jnp.round(p * n).astype(jnp.int32)  # round half to even, as Python's round


def _keep_top(scores: Array, n_pruned: Any) -> Array:
  """Keeps all but the ``n_pruned`` lowest of a 1-D ``scores`` (stable: earlier ties go first);
  ``n_pruned`` may be traced."""
  return _keep_top_rows(scores[None], n_pruned)[0]


def _keep_top_rows(scores: Array, n_pruned: Any) -> Array:
  """`_keep_top` along the last axis of a 2-D ``scores``, row by row."""
  rank = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
  return rank >= n_pruned


def _axis(axis: int, ndim: int, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what}: axis {axis} is out of range for a {ndim}-D array")
  return axis % ndim


def unstructured_mask(scores: Array, sparsity: float, *, axis: int | None = None) -> Array:
  """Keeps the highest scores; prunes ``round(sparsity * n)`` of ``n`` candidates.

  Args:
    scores: any shape; larger is more important.
    sparsity: fraction to prune, in ``[0, 1)``.
    axis: ``None`` ranks the whole array; an axis ranks each 1-D slice along it on its own
      (``axis=0`` on a ``(K, N)`` kernel: each output's K inputs, as Wanda does), pruning
      ``round(sparsity * shape[axis])`` per slice.

  Returns:
    ``bool`` mask of ``scores.shape``, ``True`` = kept.

  Example:
    >>> unstructured_mask(jnp.array([3., 1., 2., 0.]), 0.5)
    Array([ True, False,  True, False], dtype=bool)
  """
  p = _check_sparsity(sparsity)
  scores = jnp.asarray(scores)
  if axis is None:
    return _keep_top(scores.reshape(-1), _n_pruned(p, scores.size)).reshape(scores.shape)
  axis = _axis(axis, scores.ndim, "unstructured_mask")
  moved = jnp.moveaxis(scores, axis, -1)
  keep = _keep_top_rows(moved.reshape(-1, moved.shape[-1]), _n_pruned(p, moved.shape[-1]))
  return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def global_masks(scores: Any, sparsity: float) -> Any:
  """One ranking across every array of a pytree: exactly ``round(sparsity * total)`` pruned.

  Layers with less important weights lose more of them (global magnitude pruning). Scores of
  different layers must be comparable (e.g. Wanda scores within one model, or ``|w|`` of
  layers with similar scales).

  Args:
    scores: a pytree of arrays.
    sparsity: fraction of all elements to prune, in ``[0, 1)``.

  Returns:
    The pytree of ``bool`` masks.

  Example:
    >>> m = global_masks({"a": jnp.array([1., 2.]), "b": jnp.array([3., 4.])}, 0.5)
    >>> m["a"], m["b"]
    (Array([False, False], dtype=bool), Array([ True,  True], dtype=bool))
  """
  p = _check_sparsity(sparsity)
  leaves, treedef = jax.tree.flatten(scores)
  if not leaves:
    raise ValueError("global_masks: no arrays in scores")
  flat = jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(-1) for x in leaves])
  keep = _keep_top(flat, _n_pruned(p, flat.size))
  sizes = np.cumsum([int(np.size(x)) for x in leaves])[:-1]
  parts = jnp.split(keep, sizes)
  return jax.tree.unflatten(treedef, [k.reshape(jnp.shape(x)) for k, x in zip(parts, leaves)])


def nm_mask(scores: Array, n: int, m: int, *, axis: int = 0) -> Array:
  """N:M sparsity: in every run of ``m`` consecutive elements along ``axis``, keep the ``n``
  highest-scoring ones (2:4 keeps 2 of 4; sparsity ``1 - n / m``).

  Args:
    scores: any shape; ``shape[axis]`` must be a multiple of ``m``.
    n: kept per group, ``0 < n <= m``.
    m: group size.
    axis: the grouped axis; default 0, the input axis of a ``(K, N)`` kernel.

  Returns:
    ``bool`` mask of ``scores.shape``.

  Example:
    >>> nm_mask(jnp.array([[4.], [1.], [3.], [2.]]), 2, 4)[:, 0]
    Array([ True, False,  True, False], dtype=bool)
  """
  for name, v in (("n", n), ("m", m)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"N:M sparsity: {name} must be a positive int, got {v!r}")
  if n > m:
    raise ValueError(f"N:M sparsity needs N <= M, got N={n} > M={m}")
  scores = jnp.asarray(scores)
  axis = _axis(axis, scores.ndim, "nm_mask")
  if scores.shape[axis] % m:
    raise ValueError(f"N:M sparsity: axis {axis} has size {scores.shape[axis]}, not a multiple "
                     f"of M={m}")
  moved = jnp.moveaxis(scores, axis, -1)
  groups = moved.reshape(-1, m)
  keep = _keep_top_rows(groups, m - n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)


def block_mask(scores: Array, sparsity: float, block: Sequence[int]) -> Array:
  """Block sparsity on a 2-D array: whole ``(bk, bn)`` tiles kept or pruned.

  A tile's score is the mean of its scores. ``round(sparsity * n_blocks)`` tiles are pruned,
  exactly. A shape that ``block`` does not divide is padded: the ragged edge tiles are scored
  on their real elements only and kept or pruned like the others, so the *element* sparsity
  then differs slightly from ``sparsity`` (the block sparsity is exact).

  Args:
    scores: ``(K, N)``.
    sparsity: fraction of tiles to prune, in ``[0, 1)``.
    block: ``(bk, bn)``, e.g. ``(8, 128)`` or ``(128, 128)`` for TPU-aligned tiles.

  Returns:
    ``bool`` mask of ``scores.shape``.

  Example:
    >>> block_mask(jnp.arange(16.).reshape(4, 4), 0.5, (2, 2)).astype(int)
    Array([[0, 0, 0, 0],
           [0, 0, 0, 0],
           [1, 1, 1, 1],
           [1, 1, 1, 1]], dtype=int32)
  """
  p = _check_sparsity(sparsity)
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim != 2:
    raise ValueError(f"block_mask needs a 2-D array, got shape {scores.shape}")
  if (len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, np.integer))
                             or b <= 0 for b in block)):
    raise ValueError(f"block must be two positive ints (bk, bn), got {block!r}")
  (k, n), (bk, bn) = scores.shape, tuple(int(b) for b in block)
  gk, gn = -(-k // bk), -(-n // bn)
  pad = ((0, gk * bk - k), (0, gn * bn - n))
  tiles = lambda a: jnp.pad(a, pad).reshape(gk, bk, gn, bn)
  counts = tiles(jnp.ones_like(scores)).sum(axis=(1, 3))
  block_scores = tiles(scores).sum(axis=(1, 3)) / counts
  keep = _keep_top(block_scores.reshape(-1), _n_pruned(p, gk * gn)).reshape(gk, gn)
  full = jnp.repeat(jnp.repeat(keep, bk, axis=0), bn, axis=1)
  return full[:k, :n]


def structured_keep(scores: Array, sparsity: float, *, axis: int = -1, group: int = 1) -> Array:
  """Which channels (or groups of ``group`` consecutive channels, e.g. attention heads of
  ``head_dim`` columns) along ``axis`` to keep: a 1-D ``bool[shape[axis]]``.

  A channel's score is the sum of its scores over all other axes; a group's, the sum over its
  channels. ``round(sparsity * n_groups)`` groups are pruned, exactly.

  Example:
    >>> w = jnp.array([[1., 5., 2., 8.]])
    >>> structured_keep(jnp.abs(w), 0.5, axis=1)
    Array([False,  True, False,  True], dtype=bool)
    >>> structured_keep(jnp.abs(w), 0.5, axis=1, group=2)      # two "heads" of 2 columns
    Array([False, False,  True,  True], dtype=bool)
  """
  p = _check_sparsity(sparsity)
  scores = jnp.asarray(scores, jnp.float32)
  axis = _axis(axis, scores.ndim, "structured_keep")
  size = scores.shape[axis]
  if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group <= 0:
    raise ValueError(f"structured pruning: group must be a positive int, got {group!r}")
  if size % group:
    raise ValueError(f"structured pruning: axis {axis} has size {size}, not a multiple of "
                     f"group={group}")
  per_channel = jnp.sum(scores, axis=tuple(a for a in range(scores.ndim) if a != axis))
  per_group = per_channel.reshape(-1, group).sum(axis=1)
  keep = _keep_top(per_group, _n_pruned(p, per_group.size))
  return jnp.repeat(keep, group)


def structured_mask(scores: Array, sparsity: float, *, axis: int = -1, group: int = 1) -> Array:
  """`structured_keep` broadcast to a full ``bool`` mask of ``scores.shape``.

  Example:
    >>> structured_mask(jnp.array([[1., 5.], [2., 8.]]), 0.5, axis=1).astype(int)
    Array([[0, 1],
           [0, 1]], dtype=int32)
  """
  scores = jnp.asarray(scores)
  keep = structured_keep(scores, sparsity, axis=axis, group=group)
  axis = axis % scores.ndim
  shape = [1] * scores.ndim
  shape[axis] = scores.shape[axis]
  return jnp.broadcast_to(keep.reshape(shape), scores.shape)


def apply_mask(w: Array, mask: Array) -> Array:
  """``w`` with the pruned (``False``) entries set to zero, dtype kept.

  Example:
    >>> apply_mask(jnp.array([1., 2.]), jnp.array([True, False]))
    Array([1., 0.], dtype=float32)
  """
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


def sparsity(mask: Array) -> float:
  """Fraction of ``False`` (pruned) entries of ``mask``.

  Example:
    >>> sparsity(jnp.array([True, False, False, False]))
    0.75
  """
  mask = np.asarray(mask)
  return float(1.0 - mask.sum() / max(mask.size, 1))


def mask_for_spec(scores: Array, spec: Any, *, per_output: bool = False) -> Array:
  """The keep-mask of a ``(K, N)`` score matrix for a `jaxcomp.Sparsity` spec: N:M groups along
  K, whole ``spec.block`` tiles, or unstructured (ranked per output column with
  ``per_output``, else over the whole layer).

  Example:
    >>> from jaxcomp.sparse.spec import Sparsity
    >>> int(mask_for_spec(jnp.arange(8.0).reshape(8, 1), Sparsity("2:4")).sum())
    4
  """
  if spec.nm is not None:
    return nm_mask(scores, *spec.nm, axis=0)
  if spec.pattern == "block":
    return block_mask(scores, spec.sparsity, spec.block)
  return unstructured_mask(scores, spec.sparsity, axis=0 if per_output else None)
