"""Refusing non-finite inputs: the one check every transform and loader runs on its arrays.

A NaN or inf in a weight must never be *laundered*, i.e. turned into a finite but wrong value
(a NaN quantized to code 0 with a finite scale gives logits that look healthy). The model
transforms (`jaxcomp.quantize`, `jaxcomp.ptq`, `jaxcomp.prune`, `jaxcomp.factorize`,
`jaxcomp.convert`) and the checkpoint loaders therefore check their inputs once, with
`check_finite`, and refuse a non-finite value with a one-line `ValueError` naming the array,
the first bad index and, for stacked layers, the layer of the stack.

The check runs eagerly on concrete arrays only: under ``jax.jit`` / ``jax.eval_shape`` (tracers)
or on `jax.ShapeDtypeStruct` placeholders it does nothing, so the transforms still trace. It
costs one fused reduction per array and one device-to-host transfer for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# numpy arrays are checked in chunks of this many elements (no array-sized temporary).
_NUMPY_CHUNK = 1 << 22

_all_finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x)))
_rows_finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1))


def is_concrete(x: Any) -> bool:
  """Whether ``x`` is an array with values here: a numpy array or a jax array that is not a
  tracer (``jax.ShapeDtypeStruct`` and tracers under ``jit`` / ``eval_shape`` are not).

  Example:
    >>> is_concrete(jnp.ones(2)), is_concrete(jax.ShapeDtypeStruct((2,), jnp.float32))
    (True, False)
  """
  if isinstance(x, jax.core.Tracer):
    return False
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _inexact(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _numpy_all_finite(x: np.ndarray) -> bool:
  flat = np.reshape(x, -1)
  return all(bool(np.isfinite(flat[i:i + _NUMPY_CHUNK]).all())
             for i in range(0, flat.size, _NUMPY_CHUNK))


def first_nonfinite(x: Any) -> tuple[tuple[int, ...], float] | None:
  """``(index, value)`` of the first NaN / inf of ``x`` in row-major order, or None.

  Found one axis at a time (a handful of reductions, no index overflow on huge arrays).

  Args:
    x: a concrete numpy or jax array of any shape.

  Returns:
    The index as a tuple of ints (``()`` for a scalar) and the value (``nan``, ``inf`` or
    ``-inf``), or None when every value is finite.

  Example:
    >>> first_nonfinite(jnp.array([[1.0, 2.0], [jnp.inf, jnp.nan]]))
    ((1, 0), inf)
    >>> first_nonfinite(np.ones(3)) is None
    True
  """
  index = []
  y = x
  while np.ndim(y):
    if isinstance(y, np.ndarray):
      ok = np.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
    else:
      ok = np.asarray(_rows_finite(y))
    bad = np.flatnonzero(~ok)
    if not bad.size:
      return None
    index.append(int(bad[0]))
    y = y[int(bad[0])]
  value = float(np.asarray(y, np.float64) if isinstance(y, np.generic) else np.asarray(y))
  return (tuple(index), value) if not np.isfinite(value) else None


def nonfinite_message(label: str, x: Any, stack_axes: Sequence[int] = (), *,
                      refuses: str) -> str | None:
  """The one-line refusal for the first non-finite value of ``x`` (None when all are finite):
  ``"{label} has a non-finite value (nan) at index (12, 40)[ of stacked layer 2]; {refuses}"``.

  Args:
    label: what ``x`` is, e.g. ``"layers/3/attn/q_proj: kernel"``.
    x: a concrete array.
    stack_axes: axes of ``x`` that stack copies of a layer (``nnx.vmap`` / ``nn.scan``): the
      index is given within one layer, and the layer of the stack is named.
    refuses: the end of the sentence, e.g. ``"jc.ptq refuses non-finite weights"``.

  Example:
    >>> nonfinite_message("blocks/up: kernel", jnp.zeros((3, 4, 2)).at[2, 1, 0].set(jnp.nan),
    ...                   (0,), refuses="jc.quantize refuses non-finite weights")
    'blocks/up: kernel has a non-finite value (nan) at index (1, 0) of stacked layer 2; jc.quantize refuses non-finite weights'
  """
  found = first_nonfinite(x)
  if found is None:
    return None
  index, value = found
  stack_axes = sorted(a % max(len(index), 1) for a in stack_axes)
  where = ""
  if stack_axes and index:
    layer = tuple(index[a] for a in stack_axes)
    index = tuple(i for a, i in enumerate(index) if a not in stack_axes)
    where = f" of stacked layer {layer[0] if len(layer) == 1 else layer}"
  return f"{label} has a non-finite value ({value!r}) at index {index}{where}; {refuses}"


def check_finite(items: Iterable[tuple[str, Any] | tuple[str, Any, Sequence[int]]], *,
                 refuses: str) -> None:
  """Raises a one-line `ValueError` for the first item holding a NaN or inf.

  Each item is ``(label, array)`` or ``(label, array, stack_axes)`` (see `nonfinite_message`).
  Items that are not concrete floating-point arrays (tracers, `jax.ShapeDtypeStruct`, integer
  codes, `QArray` s, None) are skipped, so the check is a no-op while a transform is traced.
  All flags are computed first (one fused reduction per array, dispatched asynchronously) and
  fetched together; only the error path looks for the index.

  Args:
    items: the arrays to check, with their labels.
    refuses: how the message ends, e.g. ``"jc.ptq refuses non-finite weights"``.

  Raises:
    ValueError: ``"<label> has a non-finite value (nan) at index (i, j); <refuses>"``.

  Example:
    >>> check_finite([("w", jnp.ones((2, 2)))], refuses="f refuses non-finite weights")
    >>> check_finite([("up: kernel", jnp.array([1.0, jnp.inf]))], refuses="f refuses it")
    Traceback (most recent call last):
    ...
    ValueError: up: kernel has a non-finite value (inf) at index (1,); f refuses it
  """
  # Concrete arrays closed over by a function being traced (``jax.eval_shape(lambda:
  # jc.convert(...))``) are checked eagerly too, not turned into tracers.
  with jax.ensure_compile_time_eval():
    todo, flags = [], []
    for item in items:
      label, x = item[0], item[1]
      stack_axes = tuple(item[2]) if len(item) > 2 else ()
      if not is_concrete(x) or not _inexact(x):
        continue
      todo.append((label, x, stack_axes))
      flags.append(_numpy_all_finite(x) if isinstance(x, (np.ndarray, np.generic))
                   else _all_finite(x))
    for (label, x, stack_axes), ok in zip(todo, jax.device_get(flags)):
      if not ok:
        message = nonfinite_message(label, x, stack_axes, refuses=refuses)
        if message is not None:
          raise ValueError(message)


def check_positive(fn: str, name: str, value: Any) -> None:
  """A one-line `ValueError` unless ``value`` is a finite real number > 0 (for the scalar
  options of the array functions: GPTQ's / SparseGPT's / SVD-LLM's ``damp``; zero dampening
  leaves a singular Hessian singular, and raising it x10 keeps it 0).

  Example:
    >>> check_positive("gptq", "damp", 0.01)
    >>> check_positive("gptq", "damp", 0.0)
    Traceback (most recent call last):
    ...
    ValueError: gptq: damp must be a finite number > 0, got 0.0
  """
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value) and value > 0)
  if not ok:
    raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
