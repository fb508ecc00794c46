"""`jaxcomp.ptq`, `jaxcomp.prune` and `jaxcomp.factorize` on Flax Linen modules: the solvers of
`jaxcomp.oneshot.registry` and the `LayerResult`s of the NNX path, with calibration by
interception.

A Linen module is built by its own call, so its layers cannot be swapped out or run one block
at a time as NNX layers are. Instead:

1. One abstract pass (``jax.eval_shape``) under an interceptor finds every layer the recipe
   matches: path, type, kernel layout, and for a layer under ``nn.scan`` / ``nn.vmap`` its
   stack axis and depth (`jaxcomp.rewrite.linen_quant.stack_axis`).
2. The layers fall into groups, solved in call order: iteration i of a stack (layer i of every
   stacked layer), the module holding an unstacked layer whose name ends in ``_<n>``
   (``layers_0``; or what ``blocks=`` matches), and last the layers in no block.
3. For a group, the whole model runs (jitted) on each calibration batch with the group's layers
   re-issued through a capturing ``dot_general`` / ``conv_general_dilated``. It sends the sums a
   `LayerStats` is made of (``2 X^T X``, max and sum of ``|x|``) to the host through an ordered
   `jax.debug.callback`; the host counts a stacked layer's calls to keep iteration i's. XLA
   drops what runs after the group's last layer (dead code). Each layer is then solved and its
   *effective* weight (what the solved layer computes: its fake-quantized, pruned or factored
   kernel) is written into the variables, so later groups see the inputs the compressed model
   gives them.
4. The final weights replace the effective ones, in the layout and boxes of the stored params
   (a stacked layer's values at its stack axis): the grid-aligned kernel with ``w_step``,
   ``w_zero`` and ``in_scale`` params beside it (PTQ), the pruned kernel, or ``lowrank_a`` /
   ``lowrank_b`` in place of the kernel (factorize).

Where it differs from the NNX pipeline (`jaxcomp.oneshot.pipeline`): each group costs one
forward pass of the model per batch (the NNX path runs one block); solved layers feed later
groups their effective float weight (a W8A8 layer's activations are not quantized while
calibrating); data-free layers are solved before the calibrated ones.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from flax import linen as nn
from flax import nnx
from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.oneshot import registry
from jaxcomp.oneshot.calibrate import (LayerStats, check_finite_stats, conv_input_rows,
                                       dot_input_rows, input_moments, low_precision_conv,
                                       low_precision_dot, release_host_memory)
from jaxcomp.oneshot.pipeline import LayerResult, as_batches
from jaxcomp.oneshot.solver import relative_error
from jaxcomp.quant import dot as qdot
from jaxcomp.quant.qarray import canonical, from_canonical, to_step_layout
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import linen_quant as lq
from jaxcomp.rewrite.engine import KernelAxes, kernel_axes
from jaxcomp.rewrite.linen_lowrank import LowRankLinen

Array = jax.Array

# The NNX layer each Linen layer is solved as (the solvers register NNX types).
_TWIN = {nn.Dense: nnx.Linear, nn.DenseGeneral: nnx.LinearGeneral, nn.Conv: nnx.Conv,
         nn.Einsum: nnx.Einsum, nn.Embed: nnx.Embed}
_NUMBERED = re.compile(r".+_\d+|\d+")


@dataclasses.dataclass
class _Site:
  """One matched Linen layer as the calibration sees it."""

  keys: tuple[str, ...]
  layer: type  # the Linen class
  axes: KernelAxes  # of one layer's kernel
  shape: tuple[int, ...]  # one layer's kernel
  names: tuple[Any, ...] | None  # one layer's logical names (boxed kernels)
  axis: int | None  # the stored params' stack axis (nn.scan / nn.vmap), or None
  depth: int  # layers in the stack (1 when not stacked)
  spec: Any
  order: int  # first call
  groups: int  # Conv feature_group_count

  @property
  def path(self) -> str:
    return "/".join(self.keys)


def _default_call(module: nn.Module, variables: Any, batch: Any) -> Any:
  return module.apply(variables, *batch) if isinstance(batch, tuple) else module.apply(
      variables, batch)


def _find(module: nn.Module, variables: Any, example: Any, recipe: Recipe,
          payload: Callable[[Any], Any], call: Callable, supported: tuple[type, ...]
          ) -> list[_Site]:
  """The ``supported`` layers the recipe's ``payload`` rules match, in call order (one
  abstract pass)."""
  sites: dict[str, _Site] = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name == "__call__" and type(m) in supported and m.scope is not None
        and m.path):
      path, name = "/".join(m.path), lq.kernel_param_name(m)
      rule = recipe.match(path)
      if (path not in sites and rule is not None and not rule.skip
          and payload(rule) is not None and m.scope.has_variable("params", name)):
        raw = lq.boxed_param(m, name)
        if isinstance(raw, lq.PackedParam):
          raise ValueError(f"{path}: the kernel is packed already; one-shot transforms take "
                           "float weights")
        kernel = meta.unbox(raw)
        einsum_str = lq.einsum_str_of(m, args, kwargs)
        axes = kernel_axes(m, kernel_ndim=kernel.ndim, einsum_str=einsum_str)
        names = getattr(raw, "names", None)
        stored = lq.stored_param(variables, m.path, name)
        axis = lq.stack_axis(path, stored, tuple(kernel.shape), names)
        depth = 1 if axis is None else lq.box_value(stored).shape[axis]
        sites[path] = _Site(tuple(m.path), type(m), axes, tuple(kernel.shape), names, axis,
                            depth, payload(rule), len(sites), getattr(m, "feature_group_count", 1))
    return next_fun(*args, **kwargs)

  def run(variables, batch):
    with nn.intercept_methods(interceptor):
      return call(module, variables, batch)

  jax.eval_shape(run, variables, example)
  return list(sites.values())


def _stack_root(params: Any, site: _Site) -> str:
  """The outermost module whose every param is stacked like the layer's (the module
  ``nn.scan`` / ``nn.vmap`` lifted); the layer itself when none above it is."""
  node = params
  for n in range(1, len(site.keys)):
    node = node[site.keys[n - 1]]
    leaves = jax.tree.leaves(node, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    if all(np.ndim(lq.box_value(x)) > site.axis
           and np.shape(lq.box_value(x))[site.axis] == site.depth for x in leaves):
      return "/".join(site.keys[:n])
  return site.path


def _block(params: Any, site: _Site, pattern: re.Pattern | None) -> str | None:
  """The block a layer is calibrated with: its stack's root, the first enclosing module that
  ``pattern`` (default: a name ending in ``_<n>``) matches, or None (the last group)."""
  if site.axis is not None:
    return _stack_root(params, site)
  for n in range(1, len(site.keys)):
    prefix = "/".join(site.keys[:n])
    if (pattern.fullmatch(prefix) if pattern is not None
        else _NUMBERED.fullmatch(site.keys[n - 1])):
      return prefix
  return None


def _groups(params: Any, sites: list[_Site], blocks: str | None
            ) -> list[tuple[str | None, list[tuple[_Site, int | None]]]]:
  """``[(block label, [(site, iteration)])]`` in solve order."""
  pattern = None if blocks is None else re.compile(blocks)
  by_block: dict[str | None, list[_Site]] = collections.defaultdict(list)
  for s in sites:
    by_block[_block(params, s, pattern)].append(s)
  if blocks is not None and not any(b is not None for b in by_block):
    raise ValueError(f"blocks={blocks!r} matches no module holding a matched layer")
  groups = []
  for b in sorted((b for b in by_block if b is not None), key=lambda b: by_block[b][0].order):
    members = by_block[b]
    depths = {s.depth for s in members}
    if members[0].axis is None:
      groups.append((b, [(s, None) for s in members]))
      continue
    if len(depths) > 1:
      raise ValueError(f"{b}: its stacked layers have different depths {sorted(depths)}")
    for i in range(members[0].depth):
      groups.append((f"{b}[{i}]", [(s, i) for s in members]))
  if None in by_block:
    groups.append((None, [(s, None) for s in by_block[None]]))
  return groups


def _label(params: Any, site: _Site, i: int | None) -> str:
  """The result's path: ``layers[2]/up`` for layer 2 of a stack rooted at ``layers``."""
  if i is None:
    return site.path
  root = _stack_root(params, site)
  return f"{root}[{i}]" + site.path[len(root):]


class _Params:
  """The variables being rewritten: fresh dicts, a layer's params read and set per layer."""

  def __init__(self, variables: Any):
    self.tree = lq.fresh_dicts(dict(variables))

  def node(self, site: _Site) -> dict[str, Any]:
    node = self.tree["params"]
    for key in site.keys:
      node = node[key]
    return node

  def get(self, site: _Site, name: str, i: int | None) -> Array:
    value = jnp.asarray(lq.box_value(self.node(site)[name]))
    return value if i is None else jnp.take(value, i, axis=site.axis)

  def set(self, site: _Site, name: str, i: int | None, value: Array) -> None:
    node = self.node(site)
    stored = node[name]
    old = lq.box_value(stored)
    if i is None:
      new = jnp.asarray(value, old.dtype)
    else:
      index = (slice(None),) * site.axis + (i,)
      new = jnp.asarray(old).at[index].set(jnp.asarray(value, old.dtype))
    node[name] = stored.replace_boxed(new) if isinstance(stored, meta.AxisMetadata) else new

  def add(self, site: _Site, name: str, values: list[Array], names: tuple[Any, ...] | None,
          kernel: Any, dtype: Any) -> None:
    """A new param beside the layer's ``kernel`` (as stored): one value per layer (stacked at
    the kernel's stack axis), boxed like the kernel with ``names`` (one layer's) when it is."""
    node = self.node(site)
    value = values[0] if site.axis is None else jnp.stack(values, axis=site.axis)
    value = jnp.asarray(value, dtype)
    if isinstance(kernel, meta.Partitioned) and names is not None:
      if site.axis is not None:
        stack_name = kernel.names[site.axis]
        names = names[:site.axis] + (stack_name,) + names[site.axis:]
      node[name] = kernel.replace(value=value, names=names)
    else:
      node[name] = value


class _Recorder:
  """Host side of the capture: sums the moments each call sends, per layer, keeping only the
  wanted iteration of a stacked layer (its n-th call in a pass)."""

  def __init__(self):
    self.want: dict[str, int | None] = {}
    self.sums: dict[str, list[np.ndarray]] = {}
    self.calls: collections.Counter = collections.Counter()

  def start(self, want: dict[str, int | None]) -> None:
    self.want, self.sums = want, {}

  def record(self, path: str, count: int, h, absmax, abs_sum) -> None:
    i = self.calls[path]
    self.calls[path] += 1
    if self.want.get(path, -1) not in (None, i):
      return
    new = [np.asarray(h, np.float64), np.asarray(absmax), np.asarray(abs_sum, np.float64)]
    if path not in self.sums:
      self.sums[path] = new + [count]
    else:
      s = self.sums[path]
      s[0] += new[0]
      s[1] = np.maximum(s[1], new[1])
      s[2] += new[2]
      s[3] += count

  def stats(self, path: str) -> LayerStats:
    if path not in self.sums:
      raise ValueError(f"{path}: the calibration pass never called this layer")
    h, absmax, abs_sum, n = self.sums[path]
    return LayerStats(jnp.asarray(h / n, jnp.float32), jnp.asarray(absmax, jnp.float32),
                      jnp.asarray(abs_sum / n, jnp.float32), int(n))


class _CaptureDot:
  """A ``dot_general`` that sends its input's moments to the host, then computes the dot (in
  ``dtype`` when given)."""

  def __init__(self, path: str, recorder: _Recorder, dtype: Any):
    self.path, self.recorder, self.dtype = path, recorder, dtype

  def send(self, rows: Array) -> None:
    h, absmax, abs_sum, n = input_moments(rows)
    jax.debug.callback(functools.partial(self.recorder.record, self.path, n), h, absmax, abs_sum,
                       ordered=True)

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               **unused):
    try:
      self.send(dot_input_rows(lhs, dimension_numbers))
    except ValueError as e:
      raise ValueError(f"{self.path}: {e}") from None
    return low_precision_dot(lhs, rhs, dimension_numbers, self.dtype, precision=precision,
                             preferred_element_type=preferred_element_type)


class _CaptureConv(_CaptureDot):

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None,
               preferred_element_type=None, **unused):
    self.send(conv_input_rows(lhs, rhs.shape, window_strides, padding, lhs_dilation,
                              rhs_dilation, dimension_numbers, precision))
    return low_precision_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, self.dtype,
                              feature_group_count=feature_group_count, precision=precision,
                              preferred_element_type=preferred_element_type)


def _capture_pass(module: nn.Module, call: Callable, paths: frozenset[str],
                  recorder: _Recorder, dtype: Any) -> Callable[[Any, Any], None]:
  """A jitted forward pass whose ``paths`` layers send their input moments to ``recorder``."""

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    path = "/".join(m.path) if m.scope is not None else ""
    if context.method_name != "__call__" or path not in paths or isinstance(
        getattr(m, "dot_general", None), _CaptureDot) or isinstance(
            getattr(m, "conv_general_dilated", None), _CaptureDot):
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.Conv):
      clone = m.clone(parent=m.scope, conv_general_dilated=_CaptureConv(path, recorder, dtype),
                      conv_general_dilated_cls=None)
    else:
      clone = m.clone(parent=m.scope, dot_general=_CaptureDot(path, recorder, dtype),
                      dot_general_cls=None)
    return clone(*args, **kwargs)

  def run(variables, batch):
    with nn.intercept_methods(interceptor):
      call(module, variables, batch)  # its output is dead code: only the callbacks run

  return jax.jit(run)


# --------------------------------------------------------------------------- solving one layer


@dataclasses.dataclass
class _Solved:
  """One layer's answer: the kernel later groups run with, and the params the result keeps
  (name -> one layer's value; ``kernel`` None: the kernel is removed)."""

  effective: Array
  final: dict[str, Array | None]
  error: float
  rank: int | None = None


def _solve(kind: str, site: _Site, w: Array, stats: LayerStats | None) -> _Solved:
  spec, c = site.spec, site.axes.contracting
  solver = registry.get(kind, spec.method)
  if kind == "quant":
    if solver.solve is None:  # data-free: quantized as QAT would, the kernel unchanged
      return _Solved(qdot.fake_quant_weight(w, c, spec), {"kernel": w}, float("nan"))
    w2 = canonical(w, c).T
    sol = solver.solve(w2, stats, spec)
    back = lambda m: from_canonical(m.T, site.shape, c)
    final = {"kernel": back(sol.kernel)}
    if sol.step is not None:
      final["w_step"] = to_step_layout(sol.step.T, site.shape, c, spec)
    if sol.zero is not None:
      final["w_zero"] = to_step_layout(sol.zero.T, site.shape, c, spec)
    if sol.in_scale is not None:
      final["in_scale"] = sol.in_scale
    return _Solved(back(sol.effective), final, relative_error(w2, sol.effective, stats.h))
  w2 = canonical(w, c).T
  err = lambda w_hat: float("nan") if stats is None else relative_error(w2, w_hat, stats.h)
  if kind == "sparsity":
    w_hat = solver.solve(w2, stats, spec)
    kernel = from_canonical(w_hat.T, site.shape, c)
    return _Solved(kernel, {"kernel": kernel}, err(w_hat))
  a, b = solver.solve(w2, stats, spec)
  return _Solved(a @ b, {"kernel": None, "lowrank_a": a, "lowrank_b": b}, err(a @ b),
                 a.shape[-1])


def _check(kind: str, name: str, site: _Site) -> None:
  """The checks of the NNX path, on a Linen layer (one-line errors naming it)."""
  spec = site.spec
  solver = registry.get(kind, spec.method)
  twin = _TWIN[site.layer]
  if twin not in solver.layers:
    what = "calibrated methods" if solver.calibrated else f"method {spec.method!r}"
    linen = {v: k for k, v in _TWIN.items()}
    types = " and ".join(f"nn.{linen[t].__name__}" for t in solver.layers if t in linen)
    fix = ", use 'rtn'" if kind == "quant" else ""
    raise ValueError(f"{site.path}: {what} support {types} layers, not nn.{site.layer.__name__}; "
                     f"{registry.FIELDS[kind]}={spec.method!r} cannot solve it{fix}")
  if site.axes.batch and (kind != "quant" or solver.solve is not None):
    raise ValueError(f"{site.path}: {name} does not solve kernels with batch axes")
  if solver.calibrated and site.groups != 1:
    raise ValueError(f"{site.path}: calibrated methods do not solve grouped convolutions "
                     f"(feature_group_count={site.groups})")
  k = int(np.prod([site.shape[a] for a in site.axes.contracting]))
  n = int(np.prod(site.shape)) // k
  if kind == "sparsity" and spec.nm is not None and k % spec.nm[1]:
    raise ValueError(f"{site.path}: Sparsity.pattern {spec.pattern!r} needs the input size {k} "
                     f"to be a multiple of M={spec.nm[1]}")
  if kind == "lowrank" and spec.rank is not None and spec.rank > min(k, n):
    raise ValueError(f"{site.path}: LowRank.rank={spec.rank} is above min(in, out) = "
                     f"min{(k, n)}")


def _param_names(kind: str, site: _Site, name: str) -> tuple[Any, ...] | None:
  """One layer's logical names of a new param (None: left unboxed)."""
  if site.names is None:
    return None
  c = site.axes.contracting
  if name in ("w_step", "w_zero"):
    return tuple(None if a in c else n for a, n in enumerate(site.names))
  if name == "lowrank_a":
    return (site.names[0], None)
  if name == "lowrank_b":
    return (None, site.names[1])
  return None  # in_scale: (K,) flattened contracting axes, replicated


# --------------------------------------------------------------------------- the transform


def run_linen(kind: str, name: str, module: nn.Module, recipe: Recipe, calib: Any, *,
              variables: Any, args: tuple, payload: Callable[[Any], Any], batch_size: int,
              blocks: str | None, call: Callable | None, strict: bool, progress: bool,
              calib_dtype: Any) -> tuple[Any, list[LayerResult]]:
  """Solves every layer of a Linen module that the recipe's ``payload`` rules match; returns
  the new variables and one `LayerResult` per solved layer (``variables`` untouched).

  Example::

    new_vars, results = run_linen("quant", "ptq", module, recipe, tokens, variables=variables,
                                  args=(), payload=lambda r: r.quant, batch_size=8, blocks=None,
                                  call=None, strict=False, progress=False, calib_dtype=None)
  """
  if not isinstance(recipe, Recipe):
    raise TypeError(f"{name}: recipe must be a jaxcomp.Recipe, got {type(recipe).__name__}")
  if isinstance(module, (lq.QuantizedLinen, LowRankLinen)):
    raise TypeError(f"{name}: give the float Linen module, not the {type(module).__name__} "
                    "another transform returned")
  if variables is None or "params" not in variables:
    raise ValueError(f"{name}: a Linen module needs variables= (the dict module.init returned, "
                     "with its 'params')")
  for rule in recipe.rules:
    if payload(rule) is not None:
      registry.get(kind, payload(rule).method)  # an unknown method fails before anything runs
  call = call or _default_call
  batches = None if calib is None else as_batches(calib, batch_size, name)
  if batches is not None:
    example = batches[0]
  elif args:
    example = args if len(args) > 1 else args[0]
  else:
    raise ValueError(f"{name}: a Linen module is traced on an example batch; give calib= or "
                     "args=(example inputs,)")
  twins = {t for s in registry.SOLVERS if s.kind == kind for t in s.layers}
  supported = tuple(t for t, twin in _TWIN.items() if twin in twins)
  report = lq.report_linen(module, recipe, variables, example if isinstance(example, tuple)
                           else (example,), {}, supported)
  if strict:
    report.check()
  logging.info("jaxcomp.%s:\n%s", name, report)
  sites = _find(module, variables, example, recipe, payload, call, supported)
  for site in sites:
    _check(kind, name, site)
  lq.check_finite_linen(variables, [(s.path, s.axes.name, s.shape) for s in sites], f"jc.{name}")
  calibrated = [s for s in sites if registry.get(kind, s.spec.method).calibrated]
  if calibrated and batches is None:
    raise ValueError(f"{name}: calib is missing; {calibrated[0].path} has "
                     f"{registry.FIELDS[kind]}={calibrated[0].spec.method!r}, which needs "
                     "calibration inputs")
  params = _Params(variables)
  finals: dict[str, list[dict[str, Array | None]]] = collections.defaultdict(list)
  results: list[LayerResult] = []

  def solve(site, i, stats):
    t0 = time.perf_counter()
    solved = _solve(kind, site, params.get(site, site.axes.name, i), stats)
    params.set(site, site.axes.name, i, solved.effective)
    finals[site.path].append(solved.final)
    results.append(LayerResult(_label(params.tree["params"], site, i), site.spec.method,
                               solved.error, time.perf_counter() - t0, solved.rank))

  for site in sites:  # data-free layers first, each layer of a stack in turn
    if site not in calibrated:
      for i in range(site.depth) if site.axis is not None else [None]:
        solve(site, i, None)
  recorder, passes = _Recorder(), {}
  groups = _groups(variables["params"], calibrated, blocks)
  for label, members in tqdm(groups, desc=f"{name} blocks", disable=not progress or not groups):
    paths = frozenset(s.path for s, _ in members)
    if paths not in passes:  # one compiled pass per set of layers (shared by a stack's layers)
      passes[paths] = _capture_pass(module, call, paths, recorder, calib_dtype)
    recorder.start({s.path: i for s, i in members})
    for batch in batches:
      recorder.calls.clear()
      passes[paths](params.tree, batch)
      jax.effects_barrier()
      for s, i in members:
        if i is not None and recorder.calls[s.path] != s.depth:
          raise ValueError(f"{s.path}: called {recorder.calls[s.path]} times in one pass over "
                           f"its {s.depth} stacked layers; the calibration takes one call per "
                           "layer")
    for s, i in members:
      stats = recorder.stats(s.path)
      check_finite_stats(stats, _label(params.tree["params"], s, i))
      solve(s, i, stats)
    logging.info("jaxcomp.%s: solved %s", name, label or "the layers outside blocks")
    release_host_memory()
  _write_finals(kind, params, sites, finals)
  return params.tree, results


def _write_finals(kind: str, params: _Params, sites: list[_Site],
                  finals: dict[str, list[dict[str, Array | None]]]) -> None:
  """Puts each layer's final params in place of the effective kernels."""
  for site in sites:
    per_layer = finals[site.path]
    kernel_name = site.axes.name
    node = params.node(site)
    kernel = node[kernel_name]
    for key in per_layer[0]:
      values = [f[key] for f in per_layer]
      if key != kernel_name:
        dtype = jnp.float32 if key in ("w_step", "w_zero", "in_scale") else lq.box_value(
            kernel).dtype
        params.add(site, key, values, _param_names(kind, site, key), kernel, dtype)
      elif values[0] is None:  # factored: the kernel gives way to its factors
        del node[kernel_name]
      else:
        for i, v in enumerate(values):
          params.set(site, kernel_name, None if site.axis is None else i, v)
