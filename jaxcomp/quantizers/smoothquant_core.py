"""SmoothQuant on arrays (Xiao et al., 2022, arXiv 2211.10438): the math only, no Flax.

LLM activations have a few input features (channels) with outliers 10-100x larger than the
rest. With per-token int8 activations one outlier sets the whole token's scale and the other
features round to a handful of levels; weights, by contrast, are easy to quantize. SmoothQuant
divides each input feature ``j`` by ``s_j`` and multiplies the ``j``-th input row of the kernel
by it,

.. math::  y = x W = (x / s) \\, (s \\odot_{rows} W),\\qquad
           s_j = \\frac{\\max |X_j|^{\\alpha}}{\\max |W_{j,:}|^{1 - \\alpha}},

which is exact before rounding and *migrates* the quantization difficulty from the
activations into the weights, for W8A8. ``alpha`` is the migration strength: after smoothing,
``max|X_j / s_j| = max|X_j|^{1-alpha} max|W_j|^{1-alpha}`` and
``max|s_j W_j| = max|X_j|^alpha max|W_j|^alpha``, so ``alpha = 0.5`` balances the two ranges,
``alpha -> 1`` pushes everything into the weights (flat activations) and ``alpha = 0`` only
equalises the weight rows. The paper uses 0.5 for most models, up to 0.75-0.85 for those with
larger outliers. ``1 / s`` is folded into whatever produces ``x`` (a norm's gain, or the
previous linear layer), so smoothing costs nothing at inference.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

Array = jax.Array

# Smallest smoothing factor: keeps 1 / s finite for near-dead features.
_FLOOR = 1e-5


def smooth_scales(act_absmax: Array, w: Array, alpha: float = 0.5) -> Array:
  """SmoothQuant's per-input-feature factor ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.

  Args:
    act_absmax: ``max |x_j|`` over the calibration tokens, (K,).
    w: kernel (K, N), ``y = x @ w``; ``W_j`` is its ``j``-th (input) row.
    alpha: migration strength in [0, 1] (see the module docstring); 0.5 balances activation
      and weight ranges.

  Returns:
    ``s``, float32 (K,), at least 1e-5; 1 for dead features (zero activation range or zero
    weight row), which are left untouched.

  Raises:
    ValueError: ``w`` not 2-D, ``act_absmax`` not (K,), or ``alpha`` outside [0, 1]; the
      message names the argument.

  Example:
    >>> a = jnp.array([16.0, 1.0, 0.0])           # feature 0 is an outlier, 2 is dead
    >>> w = jnp.array([[1.0, -1.0], [4.0, 0.5], [1.0, 1.0]])
    >>> smooth_scales(a, w, alpha=0.5)
    Array([4. , 0.5, 1. ], dtype=float32)
  """
  if w.ndim != 2:
    raise ValueError(f"smooth_scales: w must be a (K, N) kernel, got shape {w.shape}")
  k = w.shape[0]
  if act_absmax.shape != (k,):
    raise ValueError(
        f"smooth_scales: act_absmax must have shape (K,) = {(k,)} to match w of shape "
        f"{w.shape}, got {act_absmax.shape}")
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smooth_scales: alpha must be a number in [0, 1], got {alpha!r}")
  a = jnp.abs(jnp.asarray(act_absmax, jnp.float32))
  wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
  live = (a > 0) & (wmax > 0)
  a, wmax = jnp.where(live, a, 1.0), jnp.where(live, wmax, 1.0)
  s = jnp.maximum(a**alpha / wmax ** (1.0 - alpha), _FLOOR)
  return jnp.where(live, s, 1.0)


def smooth(w: Array, s: Array) -> Array:
  """The smoothed kernel ``s[:, None] * w`` (w's dtype); the layer becomes ``(x / s) @ it``.

  Example:
    >>> smooth(jnp.ones((2, 3)), jnp.array([2.0, 0.5]))
    Array([[2. , 2. , 2. ],
           [0.5, 0.5, 0.5]], dtype=float32)
  """
  if s.shape != (w.shape[0],):
    raise ValueError(f"smooth: s must have shape (K,) = {(w.shape[0],)}, got {s.shape}")
  return (s[:, None].astype(jnp.float32) * w).astype(w.dtype)
