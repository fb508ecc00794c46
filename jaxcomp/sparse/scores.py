"""Importance scores for pruning, on plain arrays (no Flax): larger = keep.

* `magnitude`: ``|w|``.
* `wanda`: ``|w_kn| * ||X_k||_2`` (Sun et al. 2023, "A Simple and Effective Pruning Approach
  for Large Language Models", https://arxiv.org/abs/2306.11695): the weight times the norm of
  the input feature it multiplies over the calibration tokens; compared per output
  (``unstructured_mask(..., axis=0)`` on a ``(K, N)`` kernel) or within N:M groups.
* `taylor`: ``|w * g|``, the first-order estimate of the loss change from zeroing ``w``
  (Molchanov et al. 2019, https://arxiv.org/abs/1906.10771).
* `movement`: ``-w * g`` accumulated over training steps (Sanh et al. 2020, "Movement
  Pruning", https://arxiv.org/abs/2005.07683): weights moving away from zero score high.

Example::

  x = jax.random.normal(key, (1024, 64))            # calibration inputs of a (64, 32) kernel
  s = wanda(w, input_norms(x))                      # (64, 32)
  mask = unstructured_mask(s, 0.5, axis=0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["input_norms", "magnitude", "movement", "taylor", "wanda"]


def magnitude(w: Array) -> Array:
  """``|w|`` in float32, any shape.

  Example:
    >>> magnitude(jnp.array([-2., 1.]))
    Array([2., 1.], dtype=float32)
  """
  return jnp.abs(jnp.asarray(w, jnp.float32))


def input_norms(x: Array) -> Array:
  """``||X_k||_2`` over all leading axes of the inputs ``x: [..., K] -> [K]`` (float32).

  Example:
    >>> input_norms(jnp.array([[3., 0.], [4., 1.]]))
    Array([5., 1.], dtype=float32)
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, jnp.shape(x)[-1])
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=0))


def wanda(w: Array, x_norm: Array, *, axis: int = 0) -> Array:
  """Wanda scores ``|w| * ||X||`` with the input norms ``x_norm`` laid along ``axis``.

  Args:
    w: the kernel, ``(K, N)`` for ``y = x @ w`` (input axis 0).
    x_norm: ``[K]`` input-feature norms (`input_norms`), or ``sqrt(diag(H) * n / 2)`` from a
      GPTQ Hessian ``H = 2 X^T X / n``.
    axis: the input axis of ``w``.

  Returns:
    float32 scores of ``w.shape``.

  Example:
    >>> wanda(jnp.array([[1., -2.], [3., 1.]]), jnp.array([2., 0.5]))
    Array([[2. , 4. ],
           [1.5, 0.5]], dtype=float32)
  """
  w = jnp.asarray(w)
  axis = axis % w.ndim
  if jnp.shape(x_norm) != (w.shape[axis],):
    raise ValueError(f"wanda: x_norm shape {jnp.shape(x_norm)} must be ({w.shape[axis]},), the "
                     f"size of axis {axis} of the kernel {w.shape}")
  shape = [1] * w.ndim
  shape[axis] = w.shape[axis]
  return magnitude(w) * jnp.asarray(x_norm, jnp.float32).reshape(shape)


def taylor(w: Array, g: Array) -> Array:
  """First-order Taylor importance ``|w * g|`` (``g``: the loss gradient w.r.t. ``w``).

  Example:
    >>> taylor(jnp.array([1., -2.]), jnp.array([0.5, 0.5]))
    Array([0.5, 1. ], dtype=float32)
  """
  return jnp.abs(jnp.asarray(w, jnp.float32) * jnp.asarray(g, jnp.float32))


def movement(w: Array, g: Array) -> Array:
  """One step's movement score ``-w * g``; sum it over steps (an optimizer-state accumulator).

  Example:
    >>> movement(jnp.array([1., -2.]), jnp.array([-0.5, -0.5]))
    Array([ 0.5, -1. ], dtype=float32)
  """
  return -jnp.asarray(w, jnp.float32) * jnp.asarray(g, jnp.float32)
