"""Quantized building blocks that the rewrite engine puts into Flax NNX models.

Flax's layers expose injection points (``dot_general`` on Linear/LinearGeneral, ``einsum_op``
on Einsum, ``conv_general_dilated`` on Conv); a quantized layer is the *same* layer with its
injection point set to one of the modules here, so the class, the parameter names and the
kernel's sharding metadata are all kept. Embed has no such point and gets `QuantEmbed`, a
subclass that takes over the original embedding parameter.

The math lives in `jaxcomp.quant`; these modules only hold the spec and the learned steps.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax.nnx.nn import dtypes as nnx_dtypes

from jaxcomp.quant import dot as qdot
from jaxcomp.quant.qarray import QArray, initial_step, quantize_weight  # noqa: F401 (doctest)
from jaxcomp.quant.spec import Quant

Array = jax.Array


class QuantScale(nnx.Param):
  """A learned quantization step size (LSQ). A `nnx.Param`, so it trains with the weights;
  filter on `QuantScale` to give it its own optimizer settings."""


class QuantZero(nnx.Variable):
  """Integer-valued zero points of a solved asymmetric weight grid (e.g. asymmetric GPTQ),
  shaped like the layer's step. Not a `nnx.Param`: solved from data, not trained."""


class SmoothScale(nnx.Variable):
  """Per-input-feature smoothing ``s`` (AWQ, SmoothQuant): the layer computes
  ``(x / s) @ Q(diag(s) W)``, which equals ``x @ W`` before rounding. Not a `nnx.Param`: it is
  solved from calibration data, not trained."""


class AmaxHistory(nnx.Variable):
  """The absmax of a delayed-scaling layer's activations (row 0) and output gradient (row 1)
  at its last steps, newest first: ``(2, Quant.amax_history)``, with a stack's leading axes.

  Not a `nnx.Param`: its "gradient" is its next value (`jaxcomp.quant.dot.delayed_int_dot`),
  which `jaxcomp.amax_overwrite` writes in place of an optimizer update. All zeros until
  `jaxcomp.calibrate_amax` fills it (an uncalibrated layer computes NaN)."""


def amax_history(spec: Quant, stack_shape: Sequence[int] = ()) -> AmaxHistory | None:
  """An empty `AmaxHistory` for a layer quantized with ``spec`` (None unless delayed).

  Example:
    >>> amax_history(jc.Quant(w_bits=8, a_bits=8, g_bits=8, a_granularity="tensor",
    ...                       scaling="delayed", amax_history=4), (3,)).shape
    (3, 2, 4)
  """
  if spec.scaling != "delayed":
    return None
  return AmaxHistory(jnp.zeros((*stack_shape, 2, spec.amax_history), jnp.float32))


def promote_keep_packed(args: Sequence[Any], dtype: Any = None, inexact: bool = True) -> list[Any]:
  """Flax's ``promote_dtype`` for layers whose kernel may be a packed `QArray`.

  Arrays are promoted as usual; a `QArray` is passed through (the quantized dot reads its
  integers and scales directly). Set as a converted layer's ``promote_dtype``.

  Example:
    >>> qa = quantize_weight(jnp.ones((4, 2)), (0,), jc.Quant(w_bits=8))
    >>> x, k, b = promote_keep_packed((jnp.ones(4, jnp.bfloat16), qa, None), dtype=jnp.float32)
    >>> x.dtype, type(k).__name__, b
    (dtype('float32'), 'QArray', None)
  """
  packed = {i: a for i, a in enumerate(args) if isinstance(a, QArray)}
  rest = [None if i in packed else a for i, a in enumerate(args)]
  promoted = list(nnx_dtypes.promote_dtype(tuple(rest), dtype=dtype, inexact=inexact))
  for i, a in packed.items():
    promoted[i] = a
  return promoted


def divide_contracting(x: Array, s: Array, contracting: Sequence[int]) -> Array:
  """``x / s`` with ``s`` laid along the ``contracting`` axes of ``x`` (in that order).

  Example:
    >>> divide_contracting(jnp.ones((2, 3)), jnp.array([1.0, 2.0, 4.0]), (1,))[0]
    Array([1.  , 0.5 , 0.25], dtype=float32)
  """
  nd = x.ndim
  contracting = tuple(a % nd for a in contracting)
  s = s.reshape(tuple(x.shape[a] for a in contracting))
  order = np.argsort(contracting)
  s = jnp.transpose(s, order)
  shape = [1] * nd
  for a in sorted(contracting):
    shape[a] = x.shape[a]
  return (x / s.reshape(shape).astype(x.dtype)).astype(x.dtype)


def make_step(kernel: nnx.Variable, contracting: Sequence[int], spec: Quant, *,
              stack: int = 0) -> QuantScale:
  """LSQ step for ``kernel`` (shape from `weight_scale_shape`), initialised from the calibrated
  scale and carrying the kernel's logical axis names on its non-contracting axes.

  With ``stack`` leading axes stacking copies of a layer (``nnx.vmap``), ``contracting`` counts
  one layer's axes and the step keeps the stack axes: ``(L, 1, N)`` for L stacked Linears.

  Example:
    >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> make_step(lin.kernel, (0,), jc.Quant(w_bits=4, learn_scale=True)).shape
    (1, 32)
  """
  init = lambda w: initial_step(w, contracting, spec)
  for _ in range(stack):
    init = jax.vmap(init)
  nd = kernel[...].ndim - stack
  return step_variable(kernel, tuple(stack + a % nd for a in contracting), init(kernel[...]))


def step_variable(kernel: nnx.Variable, contracting: Sequence[int], step: Array) -> QuantScale:
  """Wraps a step array (kernel layout) as a `QuantScale` sharded like ``kernel``'s free axes.

  Example:
    >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> step_variable(lin.kernel, (0,), jnp.ones((1, 32))).shape
    (1, 32)
  """
  w = kernel[...]
  contracting = tuple(a % w.ndim for a in contracting)
  step = jnp.asarray(step, jnp.float32)
  names = kernel.get_metadata().get("out_sharding")
  meta = {}
  if names is not None:
    meta["out_sharding"] = tuple(None if a in contracting else n for a, n in enumerate(names))
  sharding = getattr(w, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and names is not None:
    spec_names = tuple(
        None if a in contracting else p for a, p in enumerate(tuple(sharding.spec) + (None,) * w.ndim)
    )[: w.ndim]
    step = jax.device_put(step, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec_names)))
  return QuantScale(step, eager_sharding=False, **meta)


class QuantDot(nnx.Module):
  """A ``dot_general`` for `nnx.Linear` / `nnx.LinearGeneral`: the right operand is the kernel.

  Example:
    >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> lin.dot_general = nnx.data(QuantDot(jc.Quant(w_bits=8, a_bits=8)))
    >>> lin(jnp.ones((4, 64))).shape
    (4, 32)
  """

  def __init__(self, spec: Quant, w_step: QuantScale | None = None,
               in_scale: SmoothScale | None = None, backend: str | None = None,
               w_zero: QuantZero | None = None, amax_history: AmaxHistory | None = None):
    self.spec = spec
    self.w_step = nnx.data(w_step)
    self.w_zero = nnx.data(w_zero)  # zero points of a solved asymmetric grid
    self.in_scale = nnx.data(in_scale)  # AWQ / SmoothQuant smoothing of the input features
    self.amax_history = nnx.data(amax_history)  # delayed scaling's absmax history
    self.calibrating = False  # static: set by jaxcomp.calibrate_amax on its own copy
    self.backend = qdot.kernel_backend(backend)  # resolved once, here (static)

  def __call__(self, lhs: Array, rhs: Array | QArray, dimension_numbers: Any,
               precision: Any = None, preferred_element_type: Any = None,
               out_sharding: Any = None) -> Array:
    if self.in_scale is not None:
      lhs = divide_contracting(lhs, self.in_scale[...], dimension_numbers[0][0])
    return qdot.quant_dot_general(
        lhs, rhs, dimension_numbers, self.spec, w_step=_value(self.w_step),
        w_zero=_value(self.w_zero), precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        backend=self.backend, amax_history=_value(self.amax_history),
        calibrating=self.calibrating)


class QuantEinsum(nnx.Module):
  """An ``einsum_op`` for `nnx.Einsum`: lowers the two-operand einsum to `quant_dot_general`.

  Example:
    >>> e = nnx.Einsum("bd,dhk->bhk", (64, 4, 16), rngs=nnx.Rngs(0))
    >>> e.einsum_op = nnx.data(QuantEinsum(jc.Quant(w_bits=4)))
    >>> e(jnp.ones((2, 64))).shape
    (2, 4, 16)
  """

  def __init__(self, spec: Quant, w_step: QuantScale | None = None,
               backend: str | None = None, amax_history: AmaxHistory | None = None):
    self.spec = spec
    self.w_step = nnx.data(w_step)
    self.amax_history = nnx.data(amax_history)  # delayed scaling's absmax history
    self.calibrating = False  # static: set by jaxcomp.calibrate_amax on its own copy
    self.backend = qdot.kernel_backend(backend)

  def __call__(self, einsum_str: str, lhs: Array, rhs: Array, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None) -> Array:
    dims, perm = einsum_dimension_numbers(einsum_str, lhs.ndim, rhs.ndim)
    y = qdot.quant_dot_general(lhs, rhs, dims, self.spec, w_step=_value(self.w_step),
                               precision=precision, preferred_element_type=preferred_element_type,
                               backend=self.backend, amax_history=_value(self.amax_history),
                               calibrating=self.calibrating)
    return jnp.transpose(y, perm)


class QuantConv(nnx.Module):
  """A ``conv_general_dilated`` for `nnx.Conv`: the kernel (and optionally the input) quantized.

  Example:
    >>> conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv.conv_general_dilated = nnx.data(QuantConv(jc.Quant(w_bits=4)))
    >>> conv(jnp.ones((1, 16, 16, 3))).shape
    (1, 16, 16, 8)
  """

  def __init__(self, spec: Quant, w_step: QuantScale | None = None,
               backend: str | None = None, w_zero: QuantZero | None = None):
    self.spec = spec
    self.w_step = nnx.data(w_step)
    self.w_zero = nnx.data(w_zero)  # zero points of a solved asymmetric grid
    self.backend = qdot.kernel_backend(backend)  # convolutions run in XLA; kept for symmetry

  def __call__(self, lhs: Array, rhs: Array, *args: Any, out_sharding: Any = None,
               **kwargs: Any) -> Array:
    return qdot.quant_conv_general_dilated(lhs, rhs, *args, spec=self.spec,
                                           w_step=_value(self.w_step),
                                           w_zero=_value(self.w_zero), **kwargs)


def packed_rows(table: QArray, ids: Array) -> Array:
  """Rows ``ids`` of a packed ``[V, D]`` embedding table, dequantized (only those rows).

  Shapes: ``table`` logical ``[V, D]`` (contracting axis 1), ``ids: int[...] -> float32[..., D]``.

  Example:
    >>> table = quantize_weight(jnp.ones((10, 4)), (1,), jc.Quant(w_bits=4))
    >>> packed_rows(table, jnp.array([[1, 2]])).shape
    (1, 2, 4)
  """
  if table.zero_point is not None:
    raise ValueError("packed embedding tables must be symmetric (no zero point)")
  flat = ids.reshape(-1)
  rows = dataclasses.replace(
      table, values=jnp.take(table.values, flat, axis=0),
      scale=jnp.take(table.scale, flat, axis=0, mode="clip")
      if table.scale.shape[0] > 1 else table.scale, shape=(flat.size, table.shape[1]),
      contracting=(1,))
  return rows.dequantize_canonical().reshape(ids.shape + (table.shape[1],))


class QuantEmbed(nnx.Embed):
  """`nnx.Embed` with a weight-only quantized table (one scale per row, or per group of the
  feature axis); both the lookup and `attend` (a tied output head) see the quantized table.

  Built from an existing Embed, whose parameter it takes over (same name, same metadata).

  Example:
    >>> emb = nnx.Embed(100, 16, rngs=nnx.Rngs(0))
    >>> q = QuantEmbed(emb, jc.Quant(w_bits=4))
    >>> q(jnp.array([1, 2])).shape, q.attend(jnp.ones((2, 16))).shape
    ((2, 16), (2, 100))
  """

  def __init__(self, embed: nnx.Embed, spec: Quant, w_step: QuantScale | None = None,
               backend: str | None = None):
    # Deliberately not calling nnx.Embed.__init__: no new table is created.
    self.embedding = embed.embedding
    self.num_embeddings = embed.num_embeddings
    self.features = embed.features
    self.dtype = embed.dtype
    self.param_dtype = embed.param_dtype
    self.promote_dtype = embed.promote_dtype
    self.spec = spec
    self.w_step = nnx.data(w_step)
    self.backend = qdot.kernel_backend(backend)

  def _rows(self, inputs: Array) -> Array:
    table = self.embedding[...]
    if isinstance(table, QArray):
      return packed_rows(table, inputs)
    fq = qdot.fake_quant_weight(table, (1,), self.spec, _value(self.w_step))
    return jnp.take(fq, inputs, axis=0)

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"QuantEmbed input must be integers, got {inputs.dtype}")
    (rows,) = nnx_dtypes.promote_dtype((self._rows(inputs),), dtype=self.dtype, inexact=False)
    return rows

  def attend(self, query: Array, out_sharding: Any = None) -> Array:
    """``query @ table.T`` through the quantized dot (a tied output head; W8A8 with a_bits)."""
    table = self.embedding[...]
    (query,) = nnx_dtypes.promote_dtype((query,), dtype=self.dtype)
    if not isinstance(table, QArray):
      (table,) = nnx_dtypes.promote_dtype((table,), dtype=self.dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    return qdot.quant_dot_general(query, table, dims, self.spec, w_step=_value(self.w_step),
                                  backend=self.backend)


def _value(v: nnx.Variable | None) -> Array | None:
  return None if v is None else v[...]


def einsum_kernel_dimension_numbers(equation: str, kernel_ndim: int) -> Any:
  """``dot_general`` dimension numbers of a two-operand einsum whose right operand is the kernel.

  Example:
    >>> einsum_kernel_dimension_numbers("bthk,hkd->btd", 3)
    (((2, 3), (0, 1)), ((), ()))
  """
  lhs = equation.replace(" ", "").split("->")[0].split(",")[0]
  lhs_ndim = len(lhs.replace("...", "")) + (1 if "..." in lhs else 0)
  return einsum_dimension_numbers(equation, lhs_ndim, kernel_ndim)[0]


def einsum_dimension_numbers(
    equation: str, lhs_ndim: int, rhs_ndim: int
) -> tuple[Any, tuple[int, ...]]:
  """``dot_general`` dimension numbers and output permutation of a two-operand einsum.

  ``jnp.einsum(eq, a, b) == jnp.transpose(lax.dot_general(a, b, dims), perm)``.

  Example:
    >>> einsum_dimension_numbers("bsd,dhk->bshk", 3, 3)
    ((((2,), (0,)), ((), ())), (0, 1, 2, 3))
  """
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"einsum {equation!r}: need the explicit form 'lhs,rhs->out'")
  ins, out = eq.split("->")
  a, b = ins.split(",")
  spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
  if "..." in eq:
    extra = lambda s, nd: nd - (len(s) - 3) if "..." in s else 0
    n = max(extra(a, lhs_ndim), extra(b, rhs_ndim))
    ell = "".join(next(spare) for _ in range(n))
    expand = lambda s, nd: s.replace("...", ell[n - extra(s, nd):])
    a, b, out = expand(a, lhs_ndim), expand(b, rhs_ndim), out.replace("...", ell)
  for s in (a, b, out):
    if len(set(s)) != len(s):
      raise ValueError(f"einsum {equation!r}: repeated index within one operand")
  if len(a) != lhs_ndim or len(b) != rhs_ndim:
    raise ValueError(f"einsum {equation!r} does not fit operand ranks {lhs_ndim}, {rhs_ndim}")
  for c in a + b:
    if c not in out and (c not in a or c not in b):
      raise ValueError(f"einsum {equation!r}: index {c!r} is summed within one operand")
  contracting = [c for c in a if c in b and c not in out]
  batch = [c for c in a if c in b and c in out]
  lf = [c for c in a if c not in b]
  rf = [c for c in b if c not in a]
  dims = ((tuple(a.index(c) for c in contracting), tuple(b.index(c) for c in contracting)),
          (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
  produced = batch + lf + rf
  return dims, tuple(produced.index(c) for c in out)
