"""Model size as stored (each weight at its bit width), and measured kernel sparsity."""

from __future__ import annotations

from collections.abc import Iterable

from flax import nnx
import jax
import numpy as np

from jaxcomp.layers.quant import QuantScale
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite.engine import iter_layers, rule_for


def model_bits(model: nnx.Module, recipe: Recipe | None = None) -> int:
  """Bits of the model's parameters as a quantized model stores them.

  A kernel (or embedding table) of a layer that ``recipe`` quantizes counts ``w_bits`` per
  element; everything else (biases, norms, learned steps, unquantized layers) counts its dtype's
  width. Per-channel scales computed on the fly are not parameters and are not counted here;
  the packed serving format (PTQ issue) reports bytes actually saved.

  Example:
    >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> model_bits(lin) // 8                               # f32 kernel + bias
    8320
  """
  total = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    width = value.dtype.itemsize * 8
    if recipe is not None and path[-1] in ("kernel", "embedding") and not isinstance(
        var, QuantScale):
      layer = "/".join(str(p) for p in path[:-1])
      rule = rule_for(model, recipe, layer)
      if rule is not None and rule.quant is not None:
        width = rule.quant.w_bits
    total += width * value.size
  return total


def kernel_sparsity(model: nnx.Module, layer_paths: Iterable[str]) -> float:
  """Fraction of exact zeros over the ``kernel`` params of the layers at ``layer_paths``.

  Example:
    >>> lin = nnx.Sequential(nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0)))
    >>> lin.layers[0].kernel[...] = jnp.array([[0., 1.], [0., 2.]])
    >>> kernel_sparsity(lin, ["layers/0"])
    0.5
  """
  layers = dict(iter_layers(model))
  kernels = [np.asarray(layers[path].kernel[...]) for path in layer_paths]
  return float(sum((w == 0).sum() for w in kernels) / max(sum(w.size for w in kernels), 1))


def param_count(model: nnx.Module) -> int:
  """Number of parameters (``nnx.Param`` leaves) of ``model``.

  Example:
    >>> param_count(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    36
  """
  return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
