"""The sequential calibration pipeline shared by `jaxcomp.ptq`, `jaxcomp.prune` and
`jaxcomp.factorize`.

Calibrated layers are solved block by block: the first block's inputs are recorded, each block
in turn runs with `Capture` hooks on its layers, its layers are solved, and the *rewritten*
block runs again to give the next block its inputs. Layers outside the blocks (e.g. an untied
``lm_head``) are solved last from one pass over the whole rewritten model. Data-free layers are
solved in the same block order, without captures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.layers import quant as qlayers
from jaxcomp.oneshot.calibrate import (Capture, ConvCapture, LayerStats, catch_inputs,
                                       check_finite_stats, find_blocks, host_buffer,
                                       low_precision_dot, natural_order, release_host_memory)
from jaxcomp.quant import dot as qdot
from jaxcomp.quant.qarray import canonical
from jaxcomp.quant.spec import options_of
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import engine

Array = jax.Array
P = jax.sharding.PartitionSpec


@dataclasses.dataclass
class LayerResult:
  """What PTQ (or pruning, or factorization) did to one layer.

  Attributes:
    path: module path.
    method: the solver (its registry name).
    error: relative output error ``||X (W_q - W)||^2 / ||X W||^2`` on the calibration inputs
      (from the Hessian; NaN for layers solved without data, e.g. RTN).
    seconds: wall time of the solve.
    rank: the rank chosen (`jaxcomp.factorize` only).
  """

  path: str
  method: str
  error: float
  seconds: float
  rank: int | None = None


def kernel_2d(m: nnx.Module) -> Array:
  """A layer's weight as ``(K, N)`` (`jaxcomp.rewrite.engine.kernel_axes`: K the contracting
  axes flattened in order, N the others), the view every solver works on; ``(L, K, N)`` for a
  stack of L layers (``nnx.vmap``).

  Example:
    >>> kernel_2d(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))).shape
    (27, 8)
  """
  axes = engine.kernel_axes(m)
  return _view_2d(axes)(getattr(m, axes.name)[...])


def kernel_2d_shape(m: nnx.Module) -> tuple[int, ...]:
  """`kernel_2d`'s shape, computed without building the view (no copy of a stacked kernel).

  Example:
    >>> kernel_2d_shape(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)))
    (27, 8)
  """
  axes = engine.kernel_axes(m)
  return jax.eval_shape(_view_2d(axes), getattr(m, axes.name)[...]).shape


def _view_2d(axes: engine.KernelAxes) -> Callable[[Array], Array]:
  return engine.over_stack(lambda w: canonical(w, axes.contracting).T, axes.stack)


def as_batches(calib: Any, batch_size: int, fn: str = "ptq") -> list[Any]:
  if calib is None:
    raise ValueError(f"{fn}: calib is missing; the recipe has calibrated methods")
  if isinstance(calib, (np.ndarray, jax.Array)):
    if calib.ndim < 1 or calib.shape[0] == 0:
      raise ValueError(f"{fn}: calib must hold at least one example, got shape {calib.shape}")
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]
  batches = list(calib)
  if not batches:
    raise ValueError(f"{fn}: calib is empty")
  return batches


@nnx.jit
def _run_block(block: nnx.Module, args: tuple, kwargs: dict) -> Any:
  return block(*args, **kwargs)


class _CalibQuantDot(nnx.Module):
  """Stands in for a weight-only `QuantDot` while calibration data flows through a solved
  block: the same fake-quantized kernel and input smoothing, the dot in ``dtype``."""

  def __init__(self, hook: qlayers.QuantDot, dtype: Any):
    self.hook = hook
    self.dtype = dtype

  def __call__(self, lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None) -> Array:
    hook = self.hook
    (lc, rc), _ = dimension_numbers
    if hook.in_scale is not None:
      lhs = qlayers.divide_contracting(lhs, hook.in_scale[...], lc)
    step = None if hook.w_step is None else hook.w_step[...]
    zero = None if hook.w_zero is None else hook.w_zero[...]
    w_hat = qdot.fake_quant_weight(rhs, rc, hook.spec, step, zero)
    return low_precision_dot(lhs, w_hat, dimension_numbers, self.dtype,
                             preferred_element_type=preferred_element_type)


def _capture_and_solve(todo: list[tuple[str, nnx.Module, Any]], run: Callable[[], None],
                       solve: Callable[..., Any], dtype: Any = None,
                       root: nnx.Module | None = None,
                       label: Callable[[str], str] | None = None) -> None:
  """Installs `Capture` hooks on ``todo``'s layers, calls ``run()``, then ``solve``s each one
  (with its plain ``dot_general`` back in place) from its input statistics. With ``root`` the
  paths are relative to it (one layer of a stack) and ``solve`` gets ``root=``; ``label`` then
  renames the result it returns (``blocks[i]/up``)."""
  captures, originals = {}, {}
  for path, m, _ in todo:
    hook, cls = ("conv_general_dilated", ConvCapture) if isinstance(m, nnx.Conv) else (
        "dot_general", Capture)
    captures[path], originals[path] = cls(kernel_2d_shape(m)[0], dtype), (hook, getattr(m, hook))
    setattr(m, hook, nnx.data(captures[path]))
  run()
  release_host_memory()
  for path, m, payload in todo:
    stats = captures.pop(path).stats()
    hook, fn = originals[path]
    setattr(m, hook, nnx.static(fn))  # the plain layer again, before the rewrite
    check_finite_stats(stats, path if label is None else label(path))
    if root is None:
      solve(path, m, payload, stats)
    else:
      solve(path, m, payload, stats, root=root).path = label(path)


def _float_acts(spec: Any) -> bool:
  """Whether calibration runs ``spec``'s solved layer with float activations (GPTQ's
  ``float_acts``)."""
  return spec.method == "gptq" and options_of(spec).float_acts


@contextlib.contextmanager
def _calibration_dots(block: nnx.Module, dtype: Any):
  """Runs the weight-only quantized layers of ``block`` in ``dtype`` for the duration, and
  those solved with ``float_acts`` as weight-only layers (in ``dtype``, or as they are)."""
  nodes = [node for _, node in nnx.iter_graph(block)]
  for node in nodes:  # checked before anything is swapped
    conv = getattr(node, "conv_general_dilated", None)
    if isinstance(conv, qlayers.QuantConv) and _float_acts(conv.spec):
      raise ValueError(f"GPTQ's float_acts covers dense layers; {type(node).__name__} is a "
                       "convolution (drop the option for its rule)")
  swapped = []
  for node in nodes:
    hook = getattr(node, "dot_general", None)
    if isinstance(hook, qlayers.QuantDot) and (
        (hook.spec.a_bits is None and dtype is not None) or _float_acts(hook.spec)):
      node.dot_general = nnx.data(_CalibQuantDot(hook, dtype))
      swapped.append((node, hook))
  try:
    yield
  finally:
    for node, hook in swapped:
      node.dot_general = hook


def plan_transform(name: str, model: nnx.Module, recipe: Recipe, calib: Any,
                   supported: Callable[[nnx.Module], bool], payload: Callable[[Any], Any],
                   needs_calib: Callable[[Any], bool], strict: bool
                   ) -> tuple[nnx.Module, list[tuple[str, nnx.Module, Any]],
                              list[tuple[str, nnx.Module, Any]]]:
  """The common start of every one-shot transform: checks the arguments, clones ``model``,
  matches the recipe's ``payload`` rules and splits the layers into calibrated and data-free
  ``(path, layer, spec)`` lists (``needs_calib(spec)``); a missing ``calib`` is a one-line error
  naming the first rule that needs it.

  Example::

    new, calibrated, plain = plan_transform("prune", model, recipe, calib, ok, payload,
                                            needs_data, strict=False)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{name}: expected a flax.nnx Module, got {type(model).__name__}")
  if not isinstance(recipe, Recipe):
    raise TypeError(f"{name}: recipe must be a jaxcomp.Recipe, got {type(recipe).__name__}")
  new = nnx.clone(model)
  todo, report = engine.plan(new, recipe, supported, payload)
  if strict:
    report.check()
  logging.info("jaxcomp.%s:\n%s", name, report)
  needs_data = lambda rule: needs_calib(payload(rule))
  calibrated = [(p, m, payload(r)) for p, m, r in todo if needs_data(r)]
  plain = [(p, m, payload(r)) for p, m, r in todo if not needs_data(r)]
  if calibrated and calib is None:
    rule = next(r for _, _, r in todo if needs_data(r))
    raise ValueError(f"{name}: calib is missing; rule {rule.label!r} has "
                     f"{type(payload(rule)).__name__}.method={payload(rule).method!r}, which "
                     "needs calibration inputs")
  return new, calibrated, plain


def solve_all(model: nnx.Module, calibrated: list[tuple[str, nnx.Module, Any]],
              solve: Callable[[str, nnx.Module, Any, LayerStats], None],
              plain: list[tuple[str, nnx.Module, Any]],
              solve_plain: Callable[[list[tuple[str, nnx.Module, Any]]], None], calib: Any, *,
              name: str, batch_size: int, blocks: str | None,
              call: Callable[[nnx.Module, Any], Any], progress: bool, calib_dtype: Any) -> None:
  """Solves ``calibrated`` layers in the sequential pipeline and ``plain`` (data-free) ones in
  the same block order (each block's before its capture); without calibrated layers, just the
  plain ones.

  Example::

    solve_all(new, calibrated, solve, plain, solve_plain, calib, name="ptq", batch_size=8,
              blocks=None, call=call, progress=False, calib_dtype=None)
  """
  if not calibrated:
    solve_plain(plain)
    return
  run_sequential(
      model, calibrated, solve, as_batches(calib, batch_size, name), blocks=blocks, call=call,
      progress=progress, calib_dtype=calib_dtype, desc=f"{name} blocks",
      before_block=lambda b: solve_plain([t for t in plain if _inside(t[0], b)]),
      before_tail=lambda in_blocks: solve_plain([t for t in plain if not in_blocks(t[0])]))


def _inside(path: str, block: str) -> bool:
  return path.startswith(block + "/")


def _next_inputs(block: nnx.Module, inputs: list[tuple[tuple, dict]], dtype: Any
                 ) -> list[tuple[tuple, dict]]:
  """The next block's inputs: this (rewritten) block's output replaces the first argument,
  in place, batch by batch (one set of activations alive, not two): each batch's output is
  waited for before the next is dispatched, so one batch's temporaries are alive at a time."""
  with _calibration_dots(block, dtype):
    for j, (args, kwargs) in enumerate(inputs):
      out = jax.block_until_ready(_run_block(block, args, kwargs))
      inputs[j] = ((out,) + tuple(args[1:]), kwargs)
  return inputs


def stacked_blocks(model: nnx.Module, layers: list[tuple[str, nnx.Module]]) -> dict[str, int]:
  """The stacked blocks holding any of ``layers`` (path -> depth): for a layer whose weight
  carries a stack axis (`jaxcomp.rewrite.engine.KernelAxes.stack`), its outermost ancestor
  module whose every array has that same leading axis (the module built under ``nnx.vmap``
  and run under ``nnx.scan``).

  Example::

    stacked_blocks(model, [("blocks/up", model.blocks.up)])     # -> {"blocks": 3}
  """
  found: dict[str, int] = {}
  for path, m in layers:
    axes = engine.kernel_axes(m)
    if axes is None or not axes.stack:
      continue
    lead = getattr(m, axes.name)[...].shape[:axes.stack]
    if axes.stack > 1:
      raise ValueError(f"{path}: the calibrated walk over stacked layers takes one stack axis, "
                       f"the weight has {axes.stack} {lead}")
    prefix = engine.stack_root(model, path, lead)
    if prefix is not None:
      found[prefix] = lead[0]
    else:
      raise ValueError(f"{path}: found no module stacking it over {lead[0]} layers with all its "
                       "arrays (the module nnx.vmap built)")
  return found


def _walk_stack(model: nnx.Module, path: str, depth: int,
                todo: list[tuple[str, nnx.Module, Any]], given: list[list[tuple[tuple, dict]]],
                solve: Callable[[str, nnx.Module, Any, LayerStats], None], dtype: Any, *,
                need_outputs: bool) -> list[tuple[tuple, dict]]:
  """Calibrates a stacked block layer by layer: slice layer i out of the stack, capture and
  solve its ``todo`` layers (reported as ``path[i]/layer``), run the rewritten layer for the
  next one's inputs; then stack the rewritten layers back in place of the block.

  ``given`` holds the block's inputs, popped here: once layer 0 has run on them nothing keeps
  them (one set of calibration activations alive at a time, plus the next while computed)."""
  inputs = given.pop()
  graphdef, state = nnx.split(engine.module_at(model, path))
  stack_name = _stack_axis_name(state)
  rel = lambda p: p[len(path) + 1:]
  out = _Restack(path, depth)
  for i in range(depth):
    block = nnx.merge(graphdef, _layer_of(state, i))
    layer_todo = [(rel(p), engine.module_at(block, rel(p)), payload) for p, _, payload in todo]

    def run_capture(block=block):
      for args, kwargs in inputs:
        jax.block_until_ready(_run_block(block, args, kwargs))  # one batch's work in flight

    _capture_and_solve(layer_todo, run_capture, solve, dtype, root=block,
                       label=lambda p, i=i: f"{path}[{i}]/{p}")
    jax.block_until_ready(nnx.state(block))  # the solvers' temporaries gone before the next pass
    if need_outputs or i < depth - 1:
      inputs = _next_inputs(block, inputs, dtype)
    out.put(i, *nnx.split(block))
    del block, layer_todo
    release_host_memory()
  del state
  new_graphdef, treedef, stacked = out.take(lambda v: _with_stack_name(v, stack_name))
  engine.set_at(model, path, nnx.merge(new_graphdef, jax.tree.unflatten(treedef, stacked)))
  return inputs


class _Restack:
  """The solved layers of a stack, written into one preallocated host buffer per variable as
  each layer is done (its own arrays then dropped), so that the stack of solved layers is
  never held twice over; `take` turns each buffer into the stacked array, one at a time."""

  def __init__(self, path: str, depth: int):
    self.path, self.depth = path, depth
    self.graphdef = self.treedef = self.first = self.buffers = None

  def put(self, i: int, graphdef: Any, state: Any) -> None:
    is_var = lambda x: isinstance(x, nnx.Variable)
    leaves, treedef = jax.tree.flatten(state, is_leaf=is_var)
    shapes = [(v[...].shape, v[...].dtype) for v in leaves]
    if self.buffers is None:
      self.graphdef, self.treedef = graphdef, treedef
      # Layer 0's variables, values as shape and placement only: the stack's metadata.
      self.first = [v.replace(jax.ShapeDtypeStruct(v[...].shape, v[...].dtype,
                                                   sharding=v[...].sharding)) for v in leaves]
      self.buffers = [host_buffer((self.depth,) + s, d) for s, d in shapes]
    elif (graphdef != self.graphdef or treedef != self.treedef
          or shapes != [(f.get_value().shape, f.get_value().dtype) for f in self.first]):
      raise ValueError(f"{self.path}: solved layer {i} of the stack differs from layer 0 in "
                       "structure or shapes (e.g. ranks chosen by energy); the stack cannot be "
                       "rebuilt")
    for buf, v in zip(self.buffers, leaves):
      buf[i] = np.asarray(v[...])

  def take(self, finish: Callable[[nnx.Variable], nnx.Variable]) -> tuple[Any, Any, list]:
    """``(graphdef, treedef, stacked variables)``: each buffer becomes its array without a
    copy on the host device (DLPack), else is placed and freed one at a time."""
    stacked = []
    while self.buffers:
      buf, v = self.buffers.pop(0), self.first.pop(0)
      stacked.append(finish(v.replace(_to_device(buf, _stacked_sharding(v.get_value())))))
      del buf
    return self.graphdef, self.treedef, stacked


def _to_device(buf: np.ndarray, where: jax.sharding.Sharding | jax.Device) -> Array:
  """``buf`` as a jax array at ``where``: on a CPU device, the host buffer itself (DLPack takes
  plain integer / float dtypes; bfloat16 and other ml_dtypes are copied)."""
  if isinstance(where, jax.Device) and where.platform == "cpu" and buf.dtype.kind in "iufc":
    array = jnp.from_dlpack(buf)
    if array.devices() == {where}:
      return array
  return jax.device_put(buf, where)


def _stacked_sharding(layer: Array) -> jax.sharding.Sharding:
  """Where a stack of arrays placed like ``layer`` goes: the same mesh axes per layer, the
  stack axis unsharded (or the layer's one device)."""
  sharding = layer.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, P(None, *sharding.spec))
  if len(sharding.device_set) != 1:
    raise ValueError(f"cannot restack layers placed by a {type(sharding).__name__}; place "
                     "the model with NamedShardings")
  return next(iter(sharding.device_set))


def _names(v: nnx.Variable) -> tuple[Any, ...] | None:
  names = v.get_metadata().get("out_sharding")
  return None if names is None else tuple(names)


def _stack_axis_name(state: Any) -> Any:
  """The logical name ``nnx.vmap(transform_metadata={nnx.PARTITION_NAME: ...})`` gave the stack
  axis (the first name of a stacked variable's ``out_sharding``), or None."""
  for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = _names(v)
    if names is not None and len(names) == v[...].ndim:
      return names[0]
  return None


def _layer_of(state: Any, i: int) -> Any:
  """Layer ``i`` of a stacked state: every array sliced, the stack axis dropped from each
  variable's logical names too (so variables made from it get per-layer names)."""

  def one(v):
    names = _names(v)
    meta = {} if names is None or len(names) != v[...].ndim else {"out_sharding": names[1:]}
    return v.replace(_take(v[...], i), **meta)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _take(x: Array, i: int) -> Array:
  """``x[i]``: on one CPU device the row of the host buffer itself (`_RowOf`), as committed as
  the stack (eager ops and jitted calls on committed and uncommitted arrays compile apart; a
  copy only where the row is not aligned for the CPU client), nothing compiled (compiled
  executables stay resident in host memory); elsewhere one compiled slice per shape with the
  index traced (eager ``x[i]`` would compile one per layer)."""
  devices = x.devices()
  if len(devices) == 1 and next(iter(devices)).platform == "cpu":
    if x.dtype.kind not in "iufc":  # bfloat16 and other ml_dtypes: DLPack does not take them
      return jax.device_put(np.asarray(x)[i], x.sharding) if x.committed else jnp.asarray(
          np.asarray(x)[i])
    row = np.asarray(_RowOf(x, i))
    return jnp.from_dlpack(row) if x.committed else jax.device_put(row)
  return _take_traced(x, i)


class _RowOf:
  """Row ``i`` of a CPU array's buffer, as a writable array interface (NumPy's own view of a
  jax array is read-only, which DLPack cannot signal; ``jax.device_put`` then copies): the
  layer of a stack the walk calibrates, without a copy. It holds the array, so the buffer outlives every view of it;
  nothing writes through it (jax arrays are immutable and the walk donates nothing)."""

  def __init__(self, x: Array, i: int):
    row = np.asarray(x)[i]
    self.owner = x
    self.__array_interface__ = dict(row.__array_interface__, data=(row.ctypes.data, False))


_take_traced = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))


def _with_stack_name(v: nnx.Variable, name: Any) -> nnx.Variable:
  """A restacked variable with the stack axis' name in front of its per-layer names."""
  names = _names(v)
  if names is None or len(names) == v[...].ndim:
    return v
  return v.replace(v[...], out_sharding=(name,) + names)


def run_sequential(model: nnx.Module, todo: list[tuple[str, nnx.Module, Any]],
                   solve: Callable[[str, nnx.Module, Any, LayerStats], None],
                   batches: list[Any], *, blocks: str | None = None,
                   call: Callable[[nnx.Module, Any], Any], progress: bool = True,
                   calib_dtype: Any = None, desc: str = "blocks",
                   before_block: Callable[[str], None] | None = None,
                   before_tail: Callable[[Callable[[str], bool]], None] | None = None,
                   ) -> Callable[[str], bool]:
  """The sequential calibration pipeline shared by `ptq` and `jaxcomp.prune` (in place).

  Records the first block's inputs, then for each block: ``before_block(path)``, `Capture`
  hooks on the block's ``todo`` layers while it runs on the recorded inputs, ``solve(path,
  layer, payload, stats)`` for each of them, and the *rewritten* block run again to give the
  next block its inputs. ``todo`` layers outside every block are solved last from one pass
  over the whole model (after ``before_tail(in_blocks)``).

  Returns:
    ``in_blocks(path)``: whether a layer path lies inside one of the blocks.

  Example::

    run_sequential(model, todo, solve, batches, call=lambda m, b: m(b))
  """
  stacks = stacked_blocks(model, [(p, m) for p, m, _ in todo])
  block_paths = find_blocks(model, [p for p, _, _ in todo if not any(
      _inside(p, b) for b in stacks)], blocks)
  if blocks is not None and not block_paths and not stacks:
    raise ValueError(f"blocks={blocks!r} matches no module of the model")
  block_paths = sorted(set(block_paths) | set(stacks), key=natural_order)
  in_blocks = lambda path: any(_inside(path, b) for b in block_paths)
  if block_paths:
    inputs = catch_inputs(model, block_paths[0], batches, call, stacked=block_paths[0] in stacks)
    for b in tqdm(block_paths, desc=desc, disable=not progress):
      if before_block is not None:
        before_block(b)
      last = b == block_paths[-1] and all(in_blocks(t[0]) for t in todo)
      if b in stacks:
        given, inputs = [inputs], None  # handed over: the walk drops them after layer 0
        inputs = _walk_stack(model, b, stacks[b], [t for t in todo if _inside(t[0], b)], given,
                             solve, calib_dtype, need_outputs=not last)
        continue
      block = engine.module_at(model, b)

      def run_capture(block=block, inputs=inputs):
        for args, kwargs in inputs:
          jax.block_until_ready(_run_block(block, args, kwargs))  # one batch's work in flight

      _capture_and_solve([t for t in todo if _inside(t[0], b)], run_capture, solve, calib_dtype)
      if last:
        break  # nothing after the last block needs its outputs
      inputs = _next_inputs(block, inputs, calib_dtype)
      release_host_memory()
    del inputs
  if before_tail is not None:
    before_tail(in_blocks)
  tail = [t for t in todo if not in_blocks(t[0])]
  if tail:
    run_model = nnx.jit(lambda m, b: call(m, b))

    def run_capture():
      for batch in batches:
        run_model(model, batch)

    _capture_and_solve(tail, run_capture, solve)
  return in_blocks
