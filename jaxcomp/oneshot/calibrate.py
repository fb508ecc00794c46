"""Calibration capture for post-training quantization: statistics of each layer's inputs.

A `Capture` module takes the place of a linear layer's ``dot_general`` for one pass; it computes
the same float dot and accumulates, over every calibration token, the second moment
``H = 2 X^T X`` (GPTQ's Hessian, AWQ's exact output-error metric), and per input feature
``max |x|`` (SmoothQuant) and ``mean |x|`` (AWQ). Nothing but these statistics is kept, so
memory is bounded by ``K^2`` per layer whatever the number of tokens.

Sequential PTQ (GPTQ's, llm-compressor's) runs the model block by block: `catch_inputs` records
the arguments the first block receives, then each block is run on the outputs of the blocks
before it *after* they were quantized, so every layer is solved for the inputs it will see.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from flax import nnx
import jax
from jax._src import dispatch  # the eager-primitive executable cache (_drop_eager_executables)
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant.finite import check_finite
from jaxcomp.rewrite.engine import module_at, set_at

Array = jax.Array


class CalibStat(nnx.Variable):
  """An accumulated calibration statistic (not a parameter)."""


class LayerStats(NamedTuple):
  """Input statistics of one linear layer over the calibration set (K = input features).

  Attributes:
    h: (K, K) float32, ``2 X^T X / n`` (the mean Hessian of the layer's squared output error).
    absmax: (K,) ``max |x_j|`` over tokens.
    mean_abs: (K,) ``mean |x_j|`` over tokens.
    count: number of tokens ``n``.
  """

  h: Array
  absmax: Array
  mean_abs: Array
  count: int


def check_finite_stats(stats: LayerStats, path: str) -> None:
  """Refuses non-finite calibration statistics of the layer at ``path`` before a solver uses
  them: a one-line `ValueError` naming the layer, the statistic (``h``, ``absmax``,
  ``mean_abs``) and its first bad index. The weights were checked before calibration, so a
  NaN or inf here comes from the calibration inputs or an activation that overflowed.

  Example:
    >>> stats = LayerStats(jnp.eye(2), jnp.array([1.0, jnp.inf]), jnp.ones(2), 4)
    >>> check_finite_stats(stats, "layers/0/mlp/up_proj")
    Traceback (most recent call last):
    ...
    ValueError: layers/0/mlp/up_proj: calibration statistic absmax has a non-finite value (inf) at index (1,); the solvers refuse non-finite calibration statistics (check the calibration inputs and the activations before this layer)
  """
  check_finite([(f"{path}: calibration statistic {name}", getattr(stats, name))
                for name in ("h", "absmax", "mean_abs")],
               refuses="the solvers refuse non-finite calibration statistics (check the "
               "calibration inputs and the activations before this layer)")


class Capture(nnx.Module):
  """A ``dot_general`` for `nnx.Linear` that records input statistics while computing the dot.

  ``H`` is accumulated from bfloat16 inputs with float32 sums (the fast path of CPU/TPU matrix
  units; the inputs' relative rounding is 2^-9, well below what GPTQ's dampening absorbs).
  With ``dtype`` the layer's own dot runs in that dtype too (float32 accumulation).

  Example::

    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    lin.dot_general = nnx.data(Capture(8))
    _ = lin(jnp.ones((3, 8)))
    lin.dot_general.stats().count
    3
  """

  def __init__(self, k: int, dtype: Any = None):
    self.dtype = dtype
    self.h = CalibStat(jnp.zeros((k, k), jnp.float32))
    self.absmax = CalibStat(jnp.zeros((k,), jnp.float32))
    self.abs_sum = CalibStat(jnp.zeros((k,), jnp.float32))
    self.count = CalibStat(jnp.zeros((), jnp.float32))

  def __call__(self, lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None) -> Array:
    self.record(dot_input_rows(lhs, dimension_numbers))
    return low_precision_dot(lhs, rhs, dimension_numbers, self.dtype, precision=precision,
                             preferred_element_type=preferred_element_type)

  def record(self, x: Array) -> None:
    """Adds the rows of ``x`` (tokens, K) to the statistics."""
    h, absmax, abs_sum, count = input_moments(x)
    self.h[...] += h
    self.absmax[...] = jnp.maximum(self.absmax[...], absmax)
    self.abs_sum[...] += abs_sum
    self.count[...] += count

  def stats(self) -> LayerStats:
    """The statistics accumulated so far (means over tokens)."""
    n = float(self.count[...])
    if n == 0:
      raise ValueError("Capture saw no tokens")
    return LayerStats(self.h[...] / n, self.absmax[...], self.abs_sum[...] / n, int(n))


class ConvCapture(Capture):
  """A ``conv_general_dilated`` for `nnx.Conv` that records the statistics of the convolution's
  input patches: each output position's receptive field, ordered as the kernel's contracting
  axes flattened (spatial taps, then input channels: the ``(K, N)`` view of
  `jaxcomp.oneshot.pipeline.kernel_2d`), so ``patches @ kernel_2d == conv``.

  Example::

    conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    conv.conv_general_dilated = nnx.data(ConvCapture(27))
    _ = conv(jnp.ones((2, 16, 16, 3)))
    conv.conv_general_dilated.stats().count          # 2 * 16 * 16 patches
    512
  """

  def __call__(self, lhs: Array, rhs: Array, window_strides: Any, padding: Any,
               lhs_dilation: Any = None, rhs_dilation: Any = None, dimension_numbers: Any = None,
               feature_group_count: int = 1, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None) -> Array:
    if feature_group_count != 1:
      raise ValueError("calibration of grouped convolutions (feature_group_count > 1) is not "
                       "supported")
    self.record(conv_input_rows(lhs, rhs.shape, window_strides, padding, lhs_dilation,
                                rhs_dilation, dimension_numbers, precision))
    return low_precision_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, self.dtype, precision=precision,
                              preferred_element_type=preferred_element_type)


def input_moments(x: Array) -> tuple[Array, Array, Array, int]:
  """The sums a `LayerStats` is made of, over the rows of ``x`` (tokens, K): ``2 X^T X``
  (bfloat16 products, float32 sums), ``max |x|``, ``sum |x|`` per feature, and the row count.

  Example:
    >>> h, absmax, abs_sum, n = input_moments(jnp.ones((3, 2)))
    >>> h.shape, n
    ((2, 2), 3)
  """
  xb = x.astype(jnp.bfloat16)
  h = 2.0 * jnp.dot(xb.T, xb, preferred_element_type=jnp.float32)
  ax = jnp.abs(x).astype(jnp.float32)
  return h, jnp.max(ax, axis=0), jnp.sum(ax, axis=0), x.shape[0]


def dot_input_rows(lhs: Array, dimension_numbers: Any) -> Array:
  """A dot's left operand as (tokens, K) rows, K its contracted (trailing) axes flattened.

  Example:
    >>> dot_input_rows(jnp.ones((2, 5, 8)), (((2,), (0,)), ((), ()))).shape
    (10, 8)
  """
  (lc, _), (lb, _) = dimension_numbers
  if lb or tuple(a % lhs.ndim for a in lc) != tuple(range(lhs.ndim - len(lc), lhs.ndim)):
    raise ValueError("calibration needs a layer contracting the trailing input axes")
  return lhs.reshape(-1, int(np.prod([lhs.shape[a] for a in lc])))


def conv_input_rows(lhs: Array, rhs_shape: Sequence[int], window_strides: Any, padding: Any,
                    lhs_dilation: Any, rhs_dilation: Any, dimension_numbers: Any,
                    precision: Any = None) -> Array:
  """A convolution's input patches as (positions, K) rows: each output position's receptive
  field, ordered as the kernel's contracting axes flattened (spatial taps, then input
  channels), so ``rows @ kernel_2d == conv``.

  Example:
    >>> conv_input_rows(jnp.ones((1, 4, 4, 3)), (3, 3, 3, 8), (1, 1), "SAME", None, None,
    ...                 ("NHWC", "HWIO", "NHWC")).shape
    (16, 27)
  """
  rhs_shape = tuple(rhs_shape)
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs_shape, dimension_numbers)
  spatial = [rhs_shape[a] for a in dn.rhs_spec[2:]]
  patches = jax.lax.conv_general_dilated_patches(
      lhs, spatial, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers=dimension_numbers, precision=precision)
  # Feature axis of the patches: (Cin, *taps) in the kernel's spatial order; the kernel's
  # contracting axes flatten as (*its spatial axes, Cin) -> reorder to that.
  patches = jnp.moveaxis(patches, dn.out_spec[1], -1)
  p = patches.reshape(-1, rhs_shape[dn.rhs_spec[1]], *spatial)
  p = jnp.moveaxis(p, 1, -1)  # (rows, *taps, Cin)
  kernel_order = sorted(range(len(spatial)), key=lambda i: dn.rhs_spec[2 + i])
  p = jnp.transpose(p, (0, *[1 + i for i in kernel_order], p.ndim - 1))
  return p.reshape(p.shape[0], -1)


def low_precision_dot(lhs: Array, rhs: Array, dimension_numbers: Any, dtype: Any, *,
                      precision: Any = None, preferred_element_type: Any = None) -> Array:
  """``lax.dot_general`` with both operands cast to ``dtype`` (None: as they are), float32
  accumulation, the result in ``lhs``'s dtype.

  Example::

    low_precision_dot(x, w, (((1,), (0,)), ((), ())), jnp.bfloat16)
  """
  if dtype is None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  y = jax.lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers,
                          preferred_element_type=jnp.float32)
  return y.astype(preferred_element_type or lhs.dtype)


def low_precision_conv(lhs: Array, rhs: Array, window_strides: Any, padding: Any,
                       lhs_dilation: Any, rhs_dilation: Any, dimension_numbers: Any, dtype: Any,
                       *, feature_group_count: int = 1, precision: Any = None,
                       preferred_element_type: Any = None) -> Array:
  """``lax.conv_general_dilated`` with both operands cast to ``dtype`` (None: as they are),
  float32 accumulation, the result in ``lhs``'s dtype (`low_precision_dot` for convolutions).

  Example::

    low_precision_conv(x, k, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"), jnp.bfloat16)
  """
  cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
  y = jax.lax.conv_general_dilated(
      cast(lhs), cast(rhs), window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count=feature_group_count, precision=precision,
      preferred_element_type=jnp.float32 if dtype is not None else preferred_element_type)
  return y if dtype is None else y.astype(preferred_element_type or lhs.dtype)


_STOP = "jaxcomp calibration: inputs recorded, forward pass stopped"


class _Stop(Exception):

  def __init__(self):
    super().__init__(_STOP)


class _Sink:
  """A plain holder (static to NNX) for the recorded arguments."""

  def __init__(self):
    self.calls: list[tuple[tuple, dict]] = []
    self.where: jax.sharding.Sharding | None = None  # where a host callback's values go


def _own_copy(v: np.ndarray) -> jax.Array:
  """A recorded callback argument as a jax array on the default device: copied once into a
  `host_buffer` that the array then owns (the callback's own arrays belong to the runtime),
  so the recorded inputs leave no holes in the heap when the walk drops them."""
  v = np.asarray(v)
  if v.dtype.kind not in "biufc":  # bfloat16 and other ml_dtypes: a plain copy
    return jnp.array(v)
  buf = host_buffer(v.shape, v.dtype)
  np.copyto(buf, v)
  return jax.device_put(buf)


class _Catcher(nnx.Module):
  """Stands in for the first block: records its arguments, then stops the forward pass.

  Called with concrete arrays (an eager model, a Python loop over layers) it records them and
  raises `_Stop`. Called inside a trace (the body of a ``lax.scan`` / ``nnx.scan`` over a stacked
  block, or a jitted model) it adds an ``io_callback`` that records the first step's arguments
  on the host and raises there, which aborts the compiled loop before the first layer's work,
  and returns zeros shaped like the real block's output (``jax.eval_shape`` of one layer of
  ``stack``, so the trace goes on). For a stack of ``depth`` layers it holds one
  ``int8[depth]`` array, so that a scan over it finds its length without the real stack."""

  def __init__(self, sink: _Sink, stack: nnx.Module | None = None):
    self.sink = sink
    if stack is None:
      self.steps, self.layer = None, None
      return
    graphdef, state = nnx.split(stack)
    self.steps = nnx.Param(jnp.zeros((jax.tree.leaves(state)[0].shape[0],), jnp.int8))
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    self.layer = _Static((graphdef, one))

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    if self.layer is None or not any(isinstance(x, jax.core.Tracer) for x in leaves):
      self.sink.calls.append((args, kwargs))
      raise _Stop
    arrays = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]
    where = self.sink.where  # the callback gets host values: put them back there

    def record(*values: np.ndarray) -> np.ndarray:
      got = list(leaves)
      for i, v in zip(arrays, values):
        got[i] = _own_copy(v) if where is None else jax.device_put(v, where)
      self.sink.calls.append(jax.tree.unflatten(treedef, got))
      raise _Stop

    # Unordered: an ordered callback threads jax's runtime token, which the raised stop would
    # leave failed for every later ordered effect of the process (effects_barrier included).
    io_callback(record, jax.ShapeDtypeStruct((), jnp.int32),
                *[leaves[i] for i in arrays], ordered=False)
    graphdef, one = self.layer.value
    out = jax.eval_shape(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k), one, args, kwargs)
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)


class _QuietStop(logging.Filter):
  """Drops the log record of a host callback that raised `_Stop`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], _Stop))


class _Static:
  """A value NNX treats as static (not a pytree of arrays)."""

  def __init__(self, value: Any):
    self.value = value


def catch_inputs(model: nnx.Module, block_path: str, batches: Sequence[Any],
                 call: Callable[[nnx.Module, Any], Any], *,
                 stacked: bool = False) -> list[tuple[tuple, dict]]:
  """The ``(args, kwargs)`` the module at ``block_path`` receives for each calibration batch.

  The model runs up to that module only (its first call), so nothing after it costs.

  Args:
    model: an NNX model (left as it was on return).
    block_path: path of the module whose inputs to record (e.g. ``"layers/0"``).
    batches: calibration batches.
    call: ``call(model, batch)`` runs the model on one batch.
    stacked: the module stacks layers run by a scan (``nnx.vmap`` + ``nnx.scan``, or
      ``lax.scan`` over a split stack): the arguments of the scan's first step, the first
      layer's, are recorded from inside the compiled scan (a host callback that then aborts it).
      The scan body must call the layer it is given (as ``nnx.scan`` over the stack or a split /
      merge per step does).

  Example::

    inputs = catch_inputs(model, "layers/0", [tokens], lambda m, b: m(b))
    args, kwargs = inputs[0]          # (hidden [B, T, D], positions [B, T]), {}
  """
  original = module_at(model, block_path)
  sink = _Sink()
  mesh = jax.sharding.get_mesh()  # the model's context mesh (`jax.set_mesh`), if any
  sink.where = None if mesh.empty else jax.sharding.NamedSharding(mesh,
                                                                  jax.sharding.PartitionSpec())
  set_at(model, block_path, _Catcher(sink, original if stacked else None))
  quiet = _QuietStop()  # jax logs every failed host callback: the stand-in's stop is no error
  logging.getLogger("jax._src.callback").addFilter(quiet)
  try:
    for batch in batches:
      n = len(sink.calls)
      try:
        jax.block_until_ready(call(model, batch))
      except _Stop:
        pass
      except Exception:  # pylint: disable=broad-except
        if len(sink.calls) != n + 1:  # not the stand-in's stop: the model's own error
          raise
        _forget_stopped_runs()
      if len(sink.calls) != n + 1:
        raise ValueError(f"calibration: the model never called {block_path!r}")
  finally:
    set_at(model, block_path, original)
    logging.getLogger("jax._src.callback").removeFilter(quiet)
  if stacked:
    _drop_eager_executables()
  release_host_memory()
  return sink.calls


def _forget_stopped_runs() -> None:
  """Drops the runtime tokens of the programs the stand-in stopped: jax keeps the last one of
  each device for `jax.effects_barrier`, and a failed one would re-raise the stop there."""
  try:
    dispatch.runtime_tokens.block_until_ready()
  except Exception as e:  # pylint: disable=broad-except
    if _STOP not in str(e):
      raise
    dispatch.runtime_tokens.clear()


def _drop_eager_executables() -> None:
  """Frees the executables compiled for single primitives run eagerly. Run eagerly, every
  operation of the model before the stack (embedding lookup, positions) compiles one of its
  own, and each stays resident (~1.4 MB of host memory on CPU, measured); none is needed
  again. Only jax's cache of eager primitives is cleared
  (later eager operations recompile in milliseconds); jitted functions keep theirs.
  `tests/oneshot/test_ptq.py` checks that this cache still exists in the installed jax."""
  dispatch.xla_primitive_callable.cache_clear()


def host_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialised host array in its own anonymous memory map: page-aligned (so the CPU
  client takes it over without a copy: `jax.device_put`), its pages committed only as they
  are written, in base pages (NumPy's allocator asks for transparent huge pages on large
  arrays, which commit 2 MB at a time), and returned to the system as soon as its array dies
  (unmapped, not left in the heap to fragment it). For the walk's long-lived host arrays:
  the restacked layers of a stack, the stacked catch's recorded inputs.

  Example:
    >>> host_buffer((2, 3), np.float32).shape
    (2, 3)
  """
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  return np.frombuffer(mmap.mmap(-1, max(size, 1)), np.uint8)[:size].view(dtype).reshape(shape)


def release_host_memory() -> None:
  """Returns the heap pages freed since the last call to the system (glibc ``malloc_trim``;
  nothing elsewhere), so a long sequential walk's resident memory follows what it holds rather
  than what it once held. Cheap (well under a millisecond): called after every block.

  Example::

    release_host_memory()   # after each block of a sequential calibration
  """
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _glibc() -> Any:
  try:
    libc = ctypes.CDLL("libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:  # not glibc (macOS, musl): nothing to trim
    return None


_LIBC = _glibc()


def find_blocks(model: nnx.Module, layer_paths: Sequence[str],
                pattern: str | None = None) -> list[str]:
  """Paths of the repeated blocks that contain the given layers, in model order.

  With ``pattern`` (a regex), the modules whose path fully matches it. Otherwise the elements
  of the outermost list of modules (``nnx.List`` / sequence, path ending in an index) that
  contain any of ``layer_paths`` (e.g. ``layers/0 .. layers/29`` for a Llama).

  Example::

    find_blocks(model, ["layers/0/attn/q_proj", "layers/1/mlp/up_proj"])
    # -> ["layers/0", "layers/1"]
  """
  paths = []
  for path, node in nnx.iter_graph(model):
    if not path or not isinstance(node, nnx.Module):
      continue
    p = "/".join(str(k) for k in path)
    if pattern is not None:
      if re.fullmatch(pattern, p):
        paths.append(p)
    elif isinstance(path[-1], int) and any(l.startswith(p + "/") for l in layer_paths):
      paths.append(p)
  # Outermost only: drop blocks nested inside another block.
  outer = [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]
  return sorted(outer, key=natural_order)


def natural_order(path: str) -> list[tuple[int, int, str]]:
  """Sort key of module paths in model order (``layers/2`` before ``layers/10``).

  Example:
    >>> sorted(["layers/10", "layers/2"], key=natural_order)
    ['layers/2', 'layers/10']
  """
  return [(0, int(k), "") if k.isdigit() else (1, 0, k) for k in path.split("/")]


def calib_tokens(tokenizer: Any, *, n_seq: int = 128, seq_len: int = 512,
                 text_path: str | None = None, seed: int = 0) -> np.ndarray:
  """``n_seq`` calibration windows of ``seq_len`` tokens from a training text.

  Windows start at random (seeded) positions of the tokenized text, as in GPTQ's C4 sampling.
  The default text is the six Jane Austen novels (`jaxcomp.data.austen`); pass ``text_path`` for
  any UTF-8 file. Never calibrate on the split you report.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (``encode(text).ids``).
    n_seq: number of windows.
    seq_len: tokens per window.
    text_path: a text file; None for the Austen novels.
    seed: window placement.

  Returns:
    int32 [n_seq, seq_len].

  Example::

    calib = calib_tokens(io.gguf_tokenizer(path))          # int32[128, 512]
  """
  from jaxcomp.data import calibration  # pylint: disable=import-outside-toplevel
  ids = np.asarray(tokenizer.encode(calibration.source_text(text_path or "austen")).ids, np.int32)
  if len(ids) < n_seq * seq_len:
    raise ValueError(f"calibration text has {len(ids)} tokens, fewer than n_seq * seq_len = "
                     f"{n_seq * seq_len}")
  return calibration.text_windows(ids, n_seq, seq_len, seed, text_path or "austen")
