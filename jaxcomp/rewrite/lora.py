"""LoRA adapters as pure rewrites: `add_lora` wraps matched linear layers, `merge_lora` folds the
adapters back into the base kernels.

The base layer stays as it is inside `jaxcomp.layers.lowrank.LoRALinear`: a float layer, or a
quantized one (QLoRA: `jaxcomp.quantize` first, then `add_lora`); only the adapters are
``nnx.LoRAParam`` and train with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
"""

from __future__ import annotations

import re
from typing import Any

from flax import linen as nn
from flax import nnx
import jax.numpy as jnp

from jaxcomp.layers.lowrank import LoRALinear
from jaxcomp.quant.qarray import QArray
from jaxcomp.rewrite import engine
from jaxcomp.rewrite.linen_lowrank import add_lora_linen, merge_lora_linen

__all__ = ["add_lora", "merge_lora"]


def add_lora(model: nnx.Module | nn.Module, pattern: str, *, rank: int, alpha: float = 16.0,
             rngs: nnx.Rngs, variables: Any = None, args: tuple[Any, ...] = ()) -> Any:
  """Returns a copy of ``model`` whose ``nnx.Linear`` layers matching ``pattern`` (a regex on
  the layer path, ``re.fullmatch``) carry a LoRA adapter of rank ``rank``; ``model`` is untouched.

  A Linen module (``nn.Dense`` layers; also a `QuantizedLinen`, for QLoRA) needs its
  ``variables`` and example ``args``; it returns ``(LoRALinen(model, ...), variables)`` with
  ``lora_a`` (K, r) / ``lora_b`` (r, N) params beside each matched kernel (boxed and, under
  ``nn.scan`` / ``nn.vmap``, stacked like it).

  Example::

    lora = add_lora(model, r".*(q|v)_proj", rank=8, alpha=16.0, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(lora, optax.adam(1e-3), wrt=nnx.LoRAParam)
    module, lora_vars = add_lora(linen_model, r".*up", rank=4, rngs=nnx.Rngs(0),
                                 variables=variables, args=(x,))          # Linen
  """
  if isinstance(model, nn.Module):
    return add_lora_linen(model, pattern, rank=rank, alpha=alpha, key=rngs.params(),
                          variables=variables, args=tuple(args))
  if variables is not None or args:
    raise TypeError("add_lora: variables= and args= are for Linen modules, not NNX models")
  engine.check_not_bridged(model)
  new = nnx.clone(model)
  matched = [(p, m) for p, m in engine.iter_layers(new)
             if re.fullmatch(pattern, p) and type(m) is nnx.Linear]
  if not matched:
    raise ValueError(f"add_lora: pattern {pattern!r} matches no nnx.Linear layer")
  for path, m in matched:
    engine.set_at(new, path, LoRALinear(m, rank=rank, alpha=alpha, rngs=rngs))
  return new


def merge_lora(model: nnx.Module | nn.Module, *, variables: Any = None) -> Any:
  """Returns a copy of ``model`` with every `LoRALinear` replaced by its base layer, whose kernel
  becomes ``kernel + (alpha / r) a @ b``. For a float base the outputs are unchanged (up to
  float rounding); a quantized base re-quantizes the merged kernel on its next call.

  Example::

    merged = merge_lora(lora)     # plain nnx.Linear layers again
    module, variables = merge_lora(lora_module, variables=lora_vars)     # Linen
  """
  if isinstance(model, nn.Module):
    return merge_lora_linen(model, variables)
  new = nnx.clone(model)
  found = [(engine.path_str(p), n) for p, n in nnx.iter_graph(new)
           if isinstance(n, LoRALinear)]
  if not found:
    raise ValueError("merge_lora: the model has no LoRA adapters")
  for path, lora in found:
    kernel = lora.base.kernel[...]
    if isinstance(kernel, QArray):
      raise ValueError(f"{path}: merge_lora needs a float (or fake-quantized) base kernel, not a "
                       "packed QArray; merge before jc.convert")
    lora.base.kernel[...] = (kernel.astype(jnp.float32) + lora.delta()).astype(kernel.dtype)
    engine.set_at(new, path, lora.base)
  return new
