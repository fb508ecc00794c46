"""Training-time sparsity as an optax transformation: masks live in the optimizer state.

`sparsify(inner, specs)` wraps any optax optimizer. Each step it runs ``inner``, and on mask
update steps it re-ranks the parameters that ``specs`` names by their score and the scheduled
sparsity; it then returns updates that leave every pruned parameter exactly zero
(``update = -param``), so after ``optax.apply_updates`` the pruned weights are 0 and stay 0
between mask updates. Masks are boolean arrays shaped like their parameters, so they shard like
them (give the mask leaves the parameters' shardings).

Schedules (`cubic_schedule`): Zhu & Gupta 2017, "To prune, or not to prune"
(https://arxiv.org/abs/1710.01878): ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``
between ``t_0`` and ``t_1``, masks updated every ``update_every`` steps in that window and
frozen after it. Without a schedule the target sparsity applies from step 0 (one shot).

Scores: ``"magnitude"`` (``|w|``); ``"movement"`` (Sanh et al. 2020: ``-sum_t w_t g_t``,
accumulated in the state); ``"taylor"`` (``sum_t |w_t g_t|``, first-order Taylor importance
accumulated over steps).

Example::

  specs = {"dense": {"kernel": jc.Sparsity("block", sparsity=0.9, block=(16, 16)),
                     "bias": None}}
  opt = sparsify(optax.adam(1e-3), specs,
                 schedule=cubic_schedule(begin_step=100, end_step=2000), update_every=100)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  params = optax.apply_updates(params, updates)     # pruned entries exactly 0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcomp.sparse import masks as masks_lib
from jaxcomp.sparse.spec import Sparsity

Array = jax.Array
SCORES = ("magnitude", "movement", "taylor")

__all__ = ["SparsityState", "cubic_schedule", "layer_mask", "sparsify"]


def cubic_schedule(begin_step: int, end_step: int, initial: float = 0.0
                   ) -> Callable[[Array], Array]:
  """Zhu & Gupta's cubic ramp of the *fraction of the target sparsity*: ``initial`` up to
  ``begin_step``, rising to 1 at ``end_step``, 1 after it. `sparsify` updates masks only inside
  ``[begin_step, end_step]``.

  Example:
    >>> f = cubic_schedule(0, 100)
    >>> [round(float(f(t)), 3) for t in (0, 50, 100, 200)]
    [0.0, 0.875, 1.0, 1.0]
  """
  if not 0 <= begin_step < end_step:
    raise ValueError(f"cubic_schedule needs 0 <= begin_step < end_step, got {begin_step}, "
                     f"{end_step}")
  if not 0.0 <= initial <= 1.0:
    raise ValueError(f"cubic_schedule: initial must be in [0, 1], got {initial}")

  def fraction(step):
    t = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return 1.0 + (initial - 1.0) * (1.0 - t) ** 3

  fraction.begin_step, fraction.end_step = begin_step, end_step
  return fraction


def layer_mask(scores: Array, spec: Sparsity, sparsity: Any) -> Array:
  """The mask of one parameter from its scores: ``spec``'s pattern at ``sparsity`` (a number or
  a traced scalar; N:M ignores it). The parameter is viewed as ``(K, N)``: all axes but the
  last are inputs (a Linear kernel, or a conv kernel's ``(kh, kw, cin)``).

  Example:
    >>> layer_mask(jnp.arange(8.).reshape(4, 2), jc.Sparsity("2:4"), 0.5).sum()
    Array(4, dtype=int32)
  """
  shape = scores.shape
  view = scores.reshape(-1, shape[-1]) if scores.ndim >= 2 else scores.reshape(-1, 1)
  if spec.nm is not None:
    keep = masks_lib.nm_mask(view, *spec.nm, axis=0)
  elif spec.pattern == "block":
    keep = masks_lib.block_mask(view, sparsity, spec.block)
  else:
    keep = masks_lib.unstructured_mask(view, sparsity)
  return keep.reshape(shape)


def _path_str(keypath: tuple[Any, ...]) -> str:
  """``"layers/0/kernel"`` from a jax key path (an nnx Variable's ``.value`` left out)."""
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
      parts.append(k.name)
  return "/".join(parts)


class SparsityState(NamedTuple):
  """`sparsify`'s state: step count, masks (None where unpruned), accumulated scores, inner."""

  count: Array
  masks: Any
  scores: Any
  inner: optax.OptState


def sparsify(inner: optax.GradientTransformation, specs: Any, *,
             schedule: Callable[[Array], Array] | None = None, update_every: int = 100,
             score: str = "magnitude") -> optax.GradientTransformation:
  """Wraps ``inner`` so the parameters named by ``specs`` are pruned on a schedule and kept so.

  Args:
    inner: the optimizer, e.g. ``optax.adamw(1e-3)``.
    specs: a pytree with the structure of the params (or a prefix of it), holding a
      `jaxcomp.Sparsity` for each parameter to prune and None elsewhere; or a function
      ``(path, param) -> Sparsity | None`` of each parameter's path (``"layers/0/kernel"``).
      The pattern and target (``Sparsity.fraction``) are used; the score is ``score``.
    schedule: ``fraction(step)`` of the target sparsity (`cubic_schedule`); None: the full
      target from step 0, masks chosen once at step 0.
    update_every: steps between mask updates inside the schedule's window.
    score: ``"magnitude"``, ``"movement"`` or ``"taylor"``.

  Returns:
    An `optax.GradientTransformation` (``update`` needs ``params``).

  Example::

    opt = sparsify(optax.sgd(0.1), {"w": jc.Sparsity(sparsity=0.5)})
  """
  if score not in SCORES:
    raise ValueError(f"sparsify: score must be one of {', '.join(SCORES)}; got {score!r}")
  if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every <= 0:
    raise ValueError(f"sparsify: update_every must be a positive int, got {update_every!r}")
  is_spec = lambda x: x is None or isinstance(x, Sparsity)

  def full_specs(params):
    if callable(specs):
      return jax.tree_util.tree_map_with_path(lambda kp, p: specs(_path_str(kp), p), params)
    try:
      return jax.tree.map(lambda spec, p: jax.tree.map(lambda _: spec, p), specs, params,
                          is_leaf=is_spec)
    except ValueError as e:
      raise ValueError(f"sparsify: specs do not match the params' structure: "
                       f"{str(e).splitlines()[0]}") from None

  def init(params):
    spec_tree = full_specs(params)
    bad = [s for s in jax.tree.leaves(spec_tree, is_leaf=is_spec) if s is not None and (
        not isinstance(s, Sparsity))]
    if bad:
      raise ValueError(f"sparsify: specs leaves must be jaxcomp.Sparsity or None, got {bad[0]!r}")
    masks = jax.tree.map(lambda spec, p: None if spec is None else jnp.ones(p.shape, bool),
                         spec_tree, params, is_leaf=is_spec)
    scores = None if score == "magnitude" else jax.tree.map(
        lambda spec, p: None if spec is None else jnp.zeros(p.shape, jnp.float32),
        spec_tree, params, is_leaf=is_spec)
    return SparsityState(jnp.zeros((), jnp.int32), masks, scores, inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("sparsify: update needs params")
    spec_tree = full_specs(params)
    step = state.count
    acc = state.scores
    if score != "magnitude":
      term = ((lambda p, g: -p * g) if score == "movement" else (lambda p, g: jnp.abs(p * g)))
      acc = jax.tree.map(lambda a, p, g: None if a is None else a + term(
          p.astype(jnp.float32), g.astype(jnp.float32)), acc, params, updates,
          is_leaf=lambda x: x is None)
    new_updates, inner_state = inner.update(updates, state.inner, params)
    if schedule is None:
      fraction, due = jnp.float32(1.0), step == 0
    else:
      fraction = schedule(step)
      if hasattr(schedule, "begin_step"):
        window = (step >= schedule.begin_step) & (step <= schedule.end_step)
        # The ramp's last step always updates, so the final masks have the exact target
        # sparsity even when end_step is not a multiple of update_every.
        due = (window & (step % update_every == 0)) | (step == schedule.end_step)
      else:
        due = step % update_every == 0

    def new_masks():
      def one(spec, mask, p, u, a):
        if spec is None:
          return None
        s = jnp.abs((p + u).astype(jnp.float32)) if a is None else a
        return layer_mask(s, spec, jnp.float32(spec.fraction) * fraction)
      acc_tree = acc if acc is not None else jax.tree.map(lambda _: None, spec_tree,
                                                          is_leaf=is_spec)
      return jax.tree.map(one, spec_tree, state.masks, params, new_updates, acc_tree,
                          is_leaf=is_spec)

    masks = jax.lax.cond(due, new_masks, lambda: state.masks)
    final = jax.tree.map(lambda m, p, u: u if m is None else jnp.where(m, u, -p),
                         masks, params, new_updates, is_leaf=lambda x: x is None)
    return final, SparsityState(step + 1, masks, acc, inner_state)

  return optax.GradientTransformation(init, update)
