"""Model size as stored: each weight at its bit width."""

from __future__ import annotations

from flax import nnx

from jaxcomp.layers.quant import QuantScale
from jaxcomp.recipe import Recipe


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
      rule = recipe.match("/".join(str(p) for p in path[:-1]))
      if rule is not None and rule.quant is not None:
        width = rule.quant.w_bits
    total += width * value.size
  return total
