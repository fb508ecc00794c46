"""Delayed scaling in training: filling a model's absmax histories and writing them each step.

A layer quantized with ``jc.Quant(..., scaling="delayed")`` scales its activations and output
gradient by the absmax of earlier steps (`jaxcomp.quant.dot.delayed_int_dot`), kept in a
`jaxcomp.AmaxHistory` beside its kernel. Each step's new history comes back as that
variable's cotangent, as Flax's fp8 layers pass their amax through the gradient of an
``_overwrite_with_gradient`` collection. Two helpers make a training loop use it:

* `calibrate_amax`: one gradient pass with scales of the tensors themselves, which fills the
  empty histories (an uncalibrated layer computes NaN).
* `amax_overwrite`: wraps an optax optimizer so that the histories take their cotangent as
  their new value, and the optimizer (its moments, clipping norm, weight decay) sees only the
  other parameters.

Example::

    model = jc.quantize(model, recipe)                       # Quant(scaling="delayed", ...)
    model = jc.calibrate_amax(model, loss_fn, batch)          # before the first step
    wrt = (nnx.Param, jc.AmaxHistory)
    opt = nnx.Optimizer(model, jc.amax_overwrite(optax.adam(1e-3)), wrt=wrt)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
    opt.update(model, grads)

Differentiate with respect to the histories too (``wrt`` above): otherwise they keep their
calibrated values. A layer called more than once in one step receives the sum of its
calls' histories (cotangents add); jaxcomp's own models call each layer once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcomp.layers.quant import AmaxHistory
from jaxcomp.rewrite.nnx_quant import quant_layers

_NAME = "amax_history"  # the hooks' attribute holding an AmaxHistory

# What a training step differentiates: the parameters and the absmax histories.
TRAINED = (nnx.Param, AmaxHistory)


def has_delayed(tree: Any) -> bool:
  """Whether ``tree`` (a model's state, params or grads) holds an absmax history.

  Example:
    >>> has_delayed({"kernel": jnp.ones(2)})
    False
  """
  return any(jax.tree.leaves(amax_mask(tree)))


def _is_history(path: tuple[Any, ...]) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == _NAME for k in path)


def amax_mask(tree: Any) -> Any:
  """``True`` at every leaf of ``tree`` (params, grads or their pure dicts) that belongs to an
  `AmaxHistory`, ``False`` elsewhere.

  Example:
    >>> amax_mask({"kernel": jnp.ones(2), "dot_general": {"amax_history": jnp.zeros((2, 4))}})
    {'dot_general': {'amax_history': True}, 'kernel': False}
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_history(path), tree)


def amax_overwrite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` for every parameter except the absmax histories, which are overwritten by their
  cotangent (the history with this step's absmax in front).

  The wrapped optimizer sees zeros in place of the histories' cotangents (so they change no
  clipping norm) and its updates for them are replaced by ``cotangent - value``; it needs the
  params (``tx.update(grads, state, params)``, as `nnx.Optimizer` and optax loops pass them).

  Example:
    >>> tx = amax_overwrite(optax.sgd(0.1))
    >>> p = {"w": jnp.ones(2), "amax_history": jnp.zeros((2, 3))}
    >>> g = {"w": jnp.ones(2), "amax_history": jnp.full((2, 3), 5.0)}
    >>> u, _ = tx.update(g, tx.init(p), p)
    >>> optax.apply_updates(p, u)["amax_history"][0].tolist(), optax.apply_updates(p, u)["w"].tolist()
    ([5.0, 5.0, 5.0], [0.8999999761581421, 0.8999999761581421])
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("amax_overwrite: the optimizer update needs params (tx.update(grads, "
                       "state, params)) to overwrite the absmax histories")
    mask = amax_mask(updates)
    inner = jax.tree.map(lambda g, h: jnp.zeros_like(g) if h else g, updates, mask)
    inner_updates, state = tx.update(inner, state, params)
    out = jax.tree.map(lambda u, g, p, h: (g - p).astype(p.dtype) if h else u,
                       inner_updates, updates, params, mask)
    return out, state

  return optax.GradientTransformation(tx.init, update)


def without_amax(grads: Any) -> Any:
  """``grads`` with the histories' cotangents zeroed: what a gradient norm should read.

  Example:
    >>> without_amax({"w": jnp.ones(2), "amax_history": jnp.ones(2)})["amax_history"].tolist()
    [0.0, 0.0]
  """
  return jax.tree.map(lambda g, h: jnp.zeros_like(g) if h else g, grads, amax_mask(grads))


def calibrate_amax(model: nnx.Module, loss_fn: Callable[..., Any], *args: Any,
                   has_aux: bool = False, **kwargs: Any) -> nnx.Module:
  """A copy of ``model`` whose delayed-scaling layers hold this batch's absmax.

  Runs the gradient of ``loss_fn(model, *args, **kwargs)`` once with every delayed layer
  scaling by its own tensors' absmax (activations forward, output gradient backward: the
  dynamic per-tensor grids), and writes the resulting histories. Call it before the first
  training step; jaxcomp's training loop does. Wrap it in ``nnx.jit`` for large models.

  Args:
    model: an NNX model from `jaxcomp.quantize` with ``Quant(scaling="delayed")`` layers.
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with has_aux).
    *args, **kwargs: the batch and whatever else ``loss_fn`` takes.

  Returns:
    The calibrated copy; ``model`` is untouched.

  Raises:
    ValueError: the model has no delayed-scaling layer.

  Example::

    model = jc.calibrate_amax(model, lambda m, x, y: jnp.mean((m(x) - y) ** 2), x, y)
  """
  model = nnx.clone(model)
  hooks = [l.hook for l in quant_layers(model) if getattr(l.hook, _NAME, None) is not None]
  if not hooks:
    raise ValueError("calibrate_amax: the model has no layer quantized with "
                     "Quant(scaling='delayed')")
  for hook in hooks:
    hook.calibrating = True
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, AmaxHistory), has_aux=has_aux)(
      model, *args, **kwargs)
  if has_aux:
    grads = grads[0]
  for hook in hooks:
    hook.calibrating = False
  nnx.update(model, grads)
  return model
