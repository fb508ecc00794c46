"""Rewrites of Flax NNX models: clone, find layers by path, swap nodes.

The input model is never touched: `nnx.clone` gives a new graph whose Variables wrap the same
(immutable) arrays, so no weight is held twice, and all surgery happens on the clone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant.dot import weight_scale_shape
from jaxcomp.quant.spec import Quant
from jaxcomp.recipe import MatchReport, Recipe, Rule

Handler = Callable[[nnx.Module, Quant], nnx.Module]


def path_str(path: tuple[Any, ...]) -> str:
  """``('layers', 0, 'attn', 'q_proj') -> 'layers/0/attn/q_proj'``."""
  return "/".join(str(p) for p in path)


def owns_params(module: nnx.Module) -> bool:
  """Whether a module holds a parameter directly (a leaf layer, not a container)."""
  return any(isinstance(v, nnx.Param) for v in vars(module).values())


def iter_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """``(path, module)`` of every module that owns parameters directly, in graph order."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and path and owns_params(node):
      yield path_str(path), node


def _is_quantized(m: nnx.Module) -> bool:
  hooks = (getattr(m, "dot_general", None), getattr(m, "einsum_op", None),
           getattr(m, "conv_general_dilated", None))
  return isinstance(m, qlayers.QuantEmbed) or any(
      isinstance(h, (qlayers.QuantDot, qlayers.QuantEinsum, qlayers.QuantConv)) for h in hooks)


# --------------------------------------------------------------------------- handlers


def _step(kernel: nnx.Variable, contracting: tuple[int, ...], spec: Quant):
  return qlayers.make_step(kernel, contracting, spec) if spec.learn_scale else None


def _check_group(kernel: nnx.Variable, contracting: tuple[int, ...], spec: Quant) -> None:
  # Raises a SpecError naming the group and the axis when it does not divide.
  weight_scale_shape(kernel[...].shape, contracting, spec)


def _quant_linear(m: nnx.Linear, spec: Quant) -> nnx.Module:
  _check_group(m.kernel, (0,), spec)
  m.dot_general = nnx.data(qlayers.QuantDot(spec, _step(m.kernel, (0,), spec)))
  return m


def _quant_linear_general(m: nnx.LinearGeneral, spec: Quant) -> nnx.Module:
  n_batch = len(m.batch_axis)
  contracting = tuple(range(n_batch, n_batch + len(m.axis)))
  _check_group(m.kernel, contracting, spec)
  m.dot_general_cls = None
  m.dot_general = nnx.data(qlayers.QuantDot(spec, _step(m.kernel, contracting, spec)))
  return m


def _quant_einsum(m: nnx.Einsum, spec: Quant) -> nnx.Module:
  contracting = qlayers.einsum_kernel_contracting(m.einsum_str, m.kernel[...].ndim)
  _check_group(m.kernel, contracting, spec)
  m.einsum_op = nnx.data(qlayers.QuantEinsum(spec, _step(m.kernel, contracting, spec)))
  return m


def _quant_conv(m: nnx.Conv, spec: Quant) -> nnx.Module:
  contracting = tuple(range(m.kernel[...].ndim - 1))
  _check_group(m.kernel, contracting, spec)
  m.conv_general_dilated = nnx.data(qlayers.QuantConv(spec, _step(m.kernel, contracting, spec)))
  return m


def _quant_embed(m: nnx.Embed, spec: Quant) -> nnx.Module:
  _check_group(m.embedding, (1,), spec)
  return qlayers.QuantEmbed(m, spec, _step(m.embedding, (1,), spec))


# Exact types: a user subclass may change the forward pass, so it is not assumed to fit.
QUANT_HANDLERS: dict[type, Handler] = {
    nnx.Linear: _quant_linear,
    nnx.LinearGeneral: _quant_linear_general,
    nnx.Einsum: _quant_einsum,
    nnx.Conv: _quant_conv,
    nnx.Embed: _quant_embed,
}


# --------------------------------------------------------------------------- engine


def plan(model: nnx.Module, recipe: Recipe, handlers: dict[type, Handler],
         kind: Callable[[Rule], Any]) -> tuple[list[tuple[str, nnx.Module, Rule]], MatchReport]:
  """Matches every parameterised layer against ``recipe``.

  Args:
    model: an NNX model.
    recipe: the rules.
    handlers: module type -> transform; types absent here are "unsupported".
    kind: picks the rule's payload for this transform (e.g. ``rule.quant``); rules whose
      payload is None are ignored by this transform.

  Returns:
    ``(todo, report)``: ``todo`` lists ``(path, module, rule)`` to transform.
  """
  relevant = [r for r in recipe.rules if r.skip or kind(r) is not None]
  matched: dict[str, list[str]] = {r.label: [] for r in relevant}
  unsupported, todo = [], []
  for path, module in iter_layers(model):
    rule = next((r for r in relevant if r.matches(path)), None)
    if rule is None:
      continue
    if rule.skip:
      matched[rule.label].append(path)
    elif type(module) in handlers and not _is_quantized(module):
      matched[rule.label].append(path)
      todo.append((path, module, rule))
    else:
      unsupported.append((path, type(module).__name__))
  unused = [label for label, paths in matched.items() if not paths]
  return todo, MatchReport(matched=matched, unused=unused, unsupported=unsupported)


def _set_at(root: nnx.Module, path: str, value: nnx.Module) -> None:
  *parents, last = path.split("/")
  node: Any = root
  for key in parents:
    node = node[int(key)] if key.isdigit() and not hasattr(node, key) else getattr(node, key)
  if last.isdigit() and not hasattr(node, last):
    node[int(last)] = value
  else:
    setattr(node, last, value)


def rewrite(model: nnx.Module, recipe: Recipe, *, handlers: dict[type, Handler],
            kind: Callable[[Rule], Any], strict: bool) -> tuple[nnx.Module, MatchReport]:
  """Clones ``model`` and applies ``handlers[type](module, kind(rule))`` to matched layers."""
  new = nnx.clone(model)
  todo, report = plan(new, recipe, handlers, kind)
  if strict:
    report.check()
  for path, module, rule in todo:
    try:
      replacement = handlers[type(module)](module, kind(rule))
    except ValueError as e:
      raise type(e)(f"{path}: {e}") from None
    if replacement is not module:
      _set_at(new, path, replacement)
  return new, report
