"""Quantization of Flax NNX layers: each supported layer gets its injection point set to a
quantized hook (`jaxcomp.layers.quant`), and `quant_layers` finds them again (for `convert`,
`ptq` and size reports). Contracting axes come from `jaxcomp.rewrite.engine.kernel_axes`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from flax import nnx

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant.spec import Quant, weight_scale_shape
from jaxcomp.rewrite.engine import Handler, iter_layers, kernel_axes


def _prepare(m: nnx.Module, spec: Quant) -> tuple[nnx.Variable, tuple[int, ...],
                                                  qlayers.QuantScale | None]:
  """The layer's weight Variable, contracting axes and (LSQ) step; validates the group size."""
  axes = kernel_axes(m)
  kernel = getattr(m, axes.name)
  # One layer's shape: a SpecError naming the group if it does not fit.
  weight_scale_shape(kernel[...].shape[axes.stack:], axes.contracting, spec)
  step = (qlayers.make_step(kernel, axes.contracting, spec, stack=axes.stack)
          if spec.learn_scale else None)
  return kernel, axes.contracting, step


# Each layer's injection point and the hook module that takes it over.
_INJECTION = {nnx.Linear: ("dot_general", qlayers.QuantDot),
              nnx.LinearGeneral: ("dot_general", qlayers.QuantDot),
              nnx.Einsum: ("einsum_op", qlayers.QuantEinsum),
              nnx.Conv: ("conv_general_dilated", qlayers.QuantConv)}


def _quant_layer(m: nnx.Module, spec: Quant) -> nnx.Module:
  """Sets the layer's injection point to its quantized hook (the layer itself is kept)."""
  kernel, _, step = _prepare(m, spec)
  attr, hook = _INJECTION[type(m)]
  if type(m) is nnx.LinearGeneral:
    m.dot_general_cls = None
  if spec.scaling == "delayed":
    if hook is qlayers.QuantConv:
      raise ValueError(f"Quant(scaling='delayed') needs an integer dot; {type(m).__name__} "
                       "convolves in float (use scaling='dynamic' for it)")
    stack = kernel[...].shape[:kernel_axes(m).stack]
    setattr(m, attr, nnx.data(hook(spec, step, amax_history=qlayers.amax_history(spec, stack))))
  else:
    setattr(m, attr, nnx.data(hook(spec, step)))
  return m


def _quant_embed(m: nnx.Embed, spec: Quant) -> nnx.Module:
  if spec.scaling == "delayed":
    raise ValueError("Quant(scaling='delayed') is not supported on Embed (its lookup has no "
                     "integer dot); use scaling='dynamic' for it")
  _, _, step = _prepare(m, spec)
  return qlayers.QuantEmbed(m, spec, step)


# Exact types: a user subclass may change the forward pass, so it is not assumed to fit.
QUANT_HANDLERS: dict[type, Handler] = {**{t: _quant_layer for t in _INJECTION},
                                        nnx.Embed: _quant_embed}


class QuantLayer(NamedTuple):
  """A quantized layer found in a model: where its kernel and its quantization live."""

  path: str
  module: nnx.Module  # the layer (nnx.Linear, ..., or QuantEmbed)
  hook: nnx.Module  # the module holding spec / w_step / in_scale (QuantDot, ...; or the layer)
  kernel_name: str  # "kernel" or "embedding"
  contracting: tuple[int, ...]  # kernel axes the layer contracts over
  batch: tuple[int, ...]  # kernel axes that are batch dims of the dot (not packable)
  spec: Quant
  stack: int = 0  # leading kernel axes stacking copies of the layer (nnx.vmap); axes above are per layer


_HOOKS = (("dot_general", qlayers.QuantDot), ("einsum_op", qlayers.QuantEinsum),
          ("conv_general_dilated", qlayers.QuantConv))


def quant_layers(model: nnx.Module) -> Iterator[QuantLayer]:
  """Every quantized layer of ``model`` (as `jaxcomp.quantize` / `jaxcomp.ptq` leave them).

  Example:
    >>> q = jc.quantize(nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0))),
    ...                 jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4))]))
    >>> [(l.path, l.contracting) for l in quant_layers(q)]
    [('layers/0', (0,))]
  """
  for path, m in iter_layers(model):
    if isinstance(m, qlayers.QuantEmbed):
      hook = m
    else:
      hook = next((getattr(m, a) for a, cls in _HOOKS
                   if isinstance(getattr(m, a, None), cls)), None)
      if hook is None:
        continue
    axes = kernel_axes(m)
    yield QuantLayer(path, m, hook, axes.name, axes.contracting, axes.batch, hook.spec,
                     axes.stack)


def set_backend(model: nnx.Module, backend: str | None) -> None:
  """Points every quantized layer of ``model`` (in place) at one kernel backend, resolved now:
  "xla", "tpu" / "gpu" (the Pallas kernels), or None for ``$JAXCOMP_KERNEL_BACKEND`` / the
  default device.

  Example:
    >>> q = jc.quantize(nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0))),
    ...                 jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=8, a_bits=8))]))
    >>> set_backend(q, "xla"); q.layers[0].dot_general.backend
    'xla'
  """
  resolved = qlayers.qdot.kernel_backend(backend)
  for layer in quant_layers(model):
    layer.hook.backend = resolved
