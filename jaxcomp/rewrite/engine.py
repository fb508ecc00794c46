"""The rewrite engine shared by every transform: find layers by path, match recipes, swap nodes,
and the one answer to "which kernel axes does this layer contract over" (`kernel_axes`).

The input model is never touched: transforms `nnx.clone` it (new Variables over the same
immutable arrays, so no weight is held twice) and operate on the clone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from flax import linen as nn
from flax import nnx
import jax
import numpy as np

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant.finite import check_finite
from jaxcomp.recipe import MatchReport, Recipe, Rule

Handler = Callable[[nnx.Module, Any], nnx.Module]


def path_str(path: tuple[Any, ...]) -> str:
  """``('layers', 0, 'attn', 'q_proj') -> 'layers/0/attn/q_proj'``.

  Example:
    >>> path_str(("layers", 0, "attn"))
    'layers/0/attn'
  """
  return "/".join(str(p) for p in path)


def owns_params(module: nnx.Module) -> bool:
  """Whether a module holds a parameter directly (a leaf layer, not a container).

  Example:
    >>> owns_params(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    True
  """
  return any(isinstance(v, nnx.Param) for v in vars(module).values())


def iter_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """``(path, module)`` of every module that owns parameters directly, in graph order.

  Example:
    >>> [p for p, _ in iter_layers(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))]
    ['layers/0']
  """
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and path and owns_params(node):
      yield path_str(path), node


def module_at(root: nnx.Module, path: str) -> nnx.Module:
  """The node at ``path`` (``"layers/0/attn"``) of an NNX model.

  Example:
    >>> m = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> type(module_at(m, "layers/0")).__name__
    'Linear'
  """
  node: Any = root
  for key in path.split("/"):
    node = node[int(key)] if key.isdigit() and not hasattr(node, key) else getattr(node, key)
  return node


def set_at(root: nnx.Module, path: str, value: nnx.Module) -> None:
  """Replaces the node at ``path`` of ``root`` by ``value`` (in place).

  Example:
    >>> m = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> set_at(m, "layers/0", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> m.layers[0].out_features
    3
  """
  *parents, last = path.split("/")
  node = module_at(root, "/".join(parents)) if parents else root
  if last.isdigit() and not hasattr(node, last):
    node[int(last)] = value
  else:
    setattr(node, last, value)


class KernelAxes(NamedTuple):
  """Where a layer's weight lives and how its dot uses it.

  Attributes:
    name: the parameter holding the weight (``"kernel"`` or ``"embedding"``).
    contracting: the weight axes the layer contracts over, in the order they are flattened
      into K (the layout `jaxcomp.QArray`, the quantized dot and every solver use: a kernel
      is viewed as ``(K, N)`` with K the contracting axes and N the others, both flattened).
    batch: weight axes that are batch dimensions of the dot (LinearGeneral ``batch_axis``,
      einsum batch indices); no solver or packed format handles these.
    stack: leading axes of the stored weight that stack copies of the layer (a layer built
      under ``nnx.vmap`` and run under ``nnx.scan``: ``(L, K, N)`` for a stack of L Linears);
      ``contracting`` and ``batch`` count the axes of *one* layer's weight, after them.
  """

  name: str
  contracting: tuple[int, ...]
  batch: tuple[int, ...] = ()
  stack: int = 0


def _layer_ndim(layer: Any) -> int | None:
  """The weight rank of one (unstacked) NNX layer, from its constructor arguments."""
  t = type(layer)
  if t in (nnx.Linear, nnx.Embed, qlayers.QuantEmbed):
    return 2
  if t is nnx.LinearGeneral:
    return len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
  if t is nnx.Conv:
    return len(layer.kernel_size) + 2
  if t is nnx.Einsum:
    return len(layer.kernel_shape)
  return None


def over_stack(fn: Callable[..., Any], stack: int, *, sequential: bool = False
               ) -> Callable[..., Any]:
  """``fn`` mapped over ``stack`` leading axes of every array argument and result (nested
  ``jax.vmap``): what a one-layer function becomes for a stacked layer. With ``sequential``
  the layers run one after another (``jax.lax.map``), so the intermediates of one layer are
  alive at a time (packing, pruning: memory bounded by one layer, not the stack).

  Example:
    >>> over_stack(lambda w: w.sum(0), 1)(jnp.ones((3, 4, 2))).shape
    (3, 2)
    >>> over_stack(lambda w: w.sum(0), 1, sequential=True)(jnp.ones((3, 4, 2))).shape
    (3, 2)
  """
  for _ in range(stack):
    if sequential:
      fn = (lambda f: lambda *args: jax.lax.map(lambda xs: f(*xs), args))(fn)
    else:
      fn = jax.vmap(fn)
  return fn


def kernel_axes(layer: Any, *, kernel_ndim: int | None = None,
                einsum_str: str | None = None) -> KernelAxes | None:
  """The one answer to "which axes of this layer's weight are contracted", for NNX and Linen.

  Args:
    layer: an NNX ``Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` / ``Embed`` (or
      `jaxcomp.layers.quant.QuantEmbed`), or a Linen ``Dense`` / ``DenseGeneral`` / ``Einsum``
      / ``Conv`` / ``Embed``.
    kernel_ndim: the weight's rank (needed for Linen ``Conv`` / ``Einsum``; NNX layers read it).
    einsum_str: a Linen Einsum's equation when given at call time.

  Returns:
    The `KernelAxes`, or None for any other layer type (exact types: a user subclass may change
    the forward pass). An Embed contracts its feature axis (a tied head computes ``x @ E.T``).

  Example:
    >>> kernel_axes(nnx.LinearGeneral((4, 64), 256, axis=(-2, -1), rngs=nnx.Rngs(0)))
    KernelAxes(name='kernel', contracting=(0, 1), batch=(), stack=0)
    >>> kernel_axes(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)))
    KernelAxes(name='kernel', contracting=(0, 1, 2), batch=(), stack=0)
  """
  axes = _one_layer_axes(layer, kernel_ndim, einsum_str)
  nd = _layer_ndim(layer)
  if axes is None or nd is None:  # Linen: one layer as seen at call time
    return axes
  stack = getattr(layer, axes.name)[...].ndim - nd
  if stack < 0:
    raise ValueError(f"{type(layer).__name__}: its {axes.name} has rank "
                     f"{getattr(layer, axes.name)[...].ndim}, below the layer's own {nd}")
  return axes._replace(stack=stack)


def _one_layer_axes(layer: Any, kernel_ndim: int | None, einsum_str: str | None
                    ) -> KernelAxes | None:
  t = type(layer)
  if t in (nnx.Embed, qlayers.QuantEmbed, nn.Embed):
    return KernelAxes("embedding", (1,))
  if t in (nnx.Linear, nn.Dense):
    return KernelAxes("kernel", (0,))
  if t is nnx.LinearGeneral:
    nb = len(layer.batch_axis)
    return KernelAxes("kernel", tuple(range(nb, nb + len(layer.axis))), tuple(range(nb)))
  if t is nn.DenseGeneral:
    axis = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    batch = layer.batch_dims
    nb = len((batch,) if isinstance(batch, int) else tuple(batch))
    return KernelAxes("kernel", tuple(range(nb, nb + len(axis))), tuple(range(nb)))
  if t in (nnx.Conv, nn.Conv):
    nd = _layer_ndim(layer) if kernel_ndim is None else kernel_ndim
    return KernelAxes("kernel", tuple(range(nd - 1)))
  if t in (nnx.Einsum, nn.Einsum):
    eq = einsum_str or layer.einsum_str
    nd = _layer_ndim(layer) if kernel_ndim is None else kernel_ndim
    (_, rc), (_, rb) = qlayers.einsum_kernel_dimension_numbers(eq, nd)
    return KernelAxes("kernel", tuple(rc), tuple(rb))
  return None


def is_quantized(m: nnx.Module) -> bool:
  """Whether an NNX layer already carries a quantized hook (or is a `QuantEmbed`).

  Example:
    >>> is_quantized(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    False
  """
  hooks = (getattr(m, "dot_general", None), getattr(m, "einsum_op", None),
           getattr(m, "conv_general_dilated", None))
  return isinstance(m, qlayers.QuantEmbed) or any(
      isinstance(h, (qlayers.QuantDot, qlayers.QuantEinsum, qlayers.QuantConv)) for h in hooks)


def stack_root(model: nnx.Module, path: str, lead: tuple[int, ...]) -> str | None:
  """The module stacking the layer at ``path`` whose weight has the leading stack axes
  ``lead``: its outermost ancestor whose every array has that same leading shape (the module
  ``nnx.vmap`` built), or None.

  Example::

    stack_root(model, "blocks/up", (3,))       # -> "blocks"
  """
  parts = path.split("/")
  for n in range(1, len(parts)):
    prefix = "/".join(parts[:n])
    leaves = jax.tree.leaves(nnx.state(module_at(model, prefix)))
    if all(getattr(x, "shape", ())[:len(lead)] == lead for x in leaves):
      return prefix
  return None


def rule_for(model: nnx.Module, rules: Recipe | list[Rule], path: str,
             module: nnx.Module | None = None) -> Rule | None:
  """The rule of the layer at ``path``: the first one matching it; for a stacked layer
  (``blocks/up`` holding L layers), the first rule matching ``blocks/up`` or ``blocks/<i>/up``,
  which must be the same for every layer i (so a recipe written for the unrolled model applies
  to the stacked one); a recipe splitting a stack is a one-line error naming the module.

  Example::

    rule_for(model, recipe, "blocks/up")    # the rule of "blocks/up" or of all "blocks/<i>/up"
  """
  rules = list(rules.rules if isinstance(rules, Recipe) else rules)
  module = module_at(model, path) if module is None else module
  first = lambda *names: next((r for r in rules if any(r.matches(n) for n in names)), None)
  axes = kernel_axes(module)
  if axes is None or axes.stack != 1:
    return first(path)
  lead = getattr(module, axes.name)[...].shape[:1]
  root = stack_root(model, path, lead)
  if root is None:
    return first(path)
  rest = path[len(root) + 1:]
  per_layer = [first(path, f"{root}/{i}/{rest}") for i in range(lead[0])]
  if any(r is not per_layer[0] for r in per_layer):
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(per_layer):
      groups.setdefault("no rule" if r is None else repr(r.label), []).append(i)
    split = "; ".join(f"{label}: layers {idx}" for label, idx in groups.items())
    raise ValueError(f"{path}: the recipe splits the {lead[0]} layers stacked in {root!r} "
                     f"({split}); a stacked module takes one rule for all its layers")
  return per_layer[0]


def check_finite_weights(layers: list[tuple[str, nnx.Module]] | list[tuple[Any, ...]],
                         transform: str) -> None:
  """Refuses non-finite weights in the layers a transform is about to rewrite: a one-line
  `ValueError` naming the layer, its weight (``kernel`` / ``embedding``), the first bad index
  and, for a stacked layer (``nnx.vmap``), the layer of the stack
  (`jaxcomp.quant.finite.check_finite`). Nothing is checked while tracing (``nnx.eval_shape``,
  ``jit``): the check runs on concrete arrays only, one fused reduction each.

  Args:
    layers: ``(path, layer, ...)`` tuples (what `plan` returns; extra fields ignored).
    transform: the public name in the message, e.g. ``"jc.ptq"``.

  Example:
    >>> m = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> check_finite_weights([("layers/0", m.layers[0])], "jc.quantize")
    >>> m.layers[0].kernel[...] = m.layers[0].kernel[...].at[1, 0].set(jnp.nan)
    >>> check_finite_weights([("layers/0", m.layers[0])], "jc.quantize")
    Traceback (most recent call last):
    ...
    ValueError: layers/0: kernel has a non-finite value (nan) at index (1, 0); jc.quantize refuses non-finite weights
  """
  items = []
  for path, module, *_ in layers:
    axes = kernel_axes(module)
    if axes is not None:
      items.append((f"{path}: {axes.name}", getattr(module, axes.name)[...],
                    tuple(range(axes.stack))))
  check_finite(items, refuses=f"{transform} refuses non-finite weights")


def check_not_bridged(model: nnx.Module) -> None:
  """A one-line error if ``model`` holds a Linen module bridged into NNX (``nnx.bridge.ToNNX``):
  its layers are Linen's, reached only through the Linen API of each transform.

  Example:
    >>> check_not_bridged(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  """
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.bridge.ToNNX):
      raise ValueError(f"{path_str(path) or 'the model'} is a bridged Linen module "
                       "(nnx.bridge.ToNNX), whose layers jaxcomp cannot reach from NNX; give the "
                       "Linen module itself with variables= and args=")


def plan(model: nnx.Module, recipe: Recipe, supported: Callable[[nnx.Module], bool] | Any,
         kind: Callable[[Rule], Any]) -> tuple[list[tuple[str, nnx.Module, Rule]], MatchReport]:
  """Matches every parameterised layer against ``recipe``.

  Args:
    model: an NNX model.
    recipe: the rules.
    supported: ``supported(layer)`` says whether this transform handles the layer (or a
      container of layer types, matched by exact type); others are reported "unsupported".
    kind: picks the rule's payload for this transform (e.g. ``rule.quant``); rules whose
      payload is None are ignored by this transform.

  Returns:
    ``(todo, report)``: ``todo`` lists ``(path, module, rule)`` to transform.

  Example::

    todo, rep = plan(model, recipe, {nnx.Linear}, lambda r: r.quant)
  """
  ok = supported if callable(supported) else (lambda m: type(m) in supported)
  check_not_bridged(model)
  relevant = [r for r in recipe.rules if r.skip or kind(r) is not None]
  matched: dict[str, list[str]] = {r.label: [] for r in relevant}
  unsupported, todo, depth = [], [], {}
  for path, module in iter_layers(model):
    rule = rule_for(model, relevant, path, module)
    if rule is None:
      continue
    if rule.skip:
      matched[rule.label].append(path)
    elif ok(module) and not is_quantized(module):
      matched[rule.label].append(path)
      todo.append((path, module, rule))
      axes = kernel_axes(module)
      if axes is not None and axes.stack:
        depth[path] = int(np.prod(getattr(module, axes.name)[...].shape[:axes.stack]))
    else:
      unsupported.append((path, type(module).__name__))
  unused = [label for label, paths in matched.items() if not paths]
  return todo, MatchReport(matched=matched, unused=unused, unsupported=unsupported, depth=depth)


def rewrite(model: nnx.Module, recipe: Recipe, *, handlers: dict[type, Handler],
            kind: Callable[[Rule], Any], strict: bool,
            transform: str | None = None) -> tuple[nnx.Module, MatchReport]:
  """Clones ``model`` and applies ``handlers[type](module, kind(rule))`` to matched layers.

  With ``transform`` (its public name, e.g. ``"jc.quantize"``), the matched layers' weights are
  checked first (`check_finite_weights`): a NaN or inf is a one-line error naming the layer.

  Example::

    new, rep = rewrite(model, recipe, handlers=QUANT_HANDLERS, kind=lambda r: r.quant,
                       strict=True)
  """
  new = nnx.clone(model)
  todo, report = plan(new, recipe, handlers, kind)
  if strict:
    report.check()
  if transform is not None:
    check_finite_weights(todo, transform)
  for path, module, rule in todo:
    try:
      replacement = handlers[type(module)](module, kind(rule))
    except ValueError as e:
      raise type(e)(f"{path}: {e}") from None
    if replacement is not module:
      set_at(new, path, replacement)
  return new, report
