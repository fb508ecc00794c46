"""Assembles a :class:`~jaxcomp.models.llama.Llama` from named numpy arrays.

Shared by the GGUF and safetensors loaders: each loader maps its checkpoint's
tensor names to our parameter paths (``"layers/0/attn/q_proj/kernel"``) and
hands over arrays already in our layout (kernels ``[in, out]``); this module
checks every shape against an abstract model (``nnx.eval_shape``, so no random
weights are ever materialised) and fills it in.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Mapping
from typing import NamedTuple

from flax import nnx
import jax.numpy as jnp
import numpy as np

from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers


class Source(NamedTuple):
  """Where one parameter comes from: checkpoint tensor ``name`` and a loader.

  ``load()`` returns the array in our layout; it is called once, after the
  tensor's presence is checked, so large checkpoints are read lazily.
  """

  name: str  # tensor name in the checkpoint, used in error messages.
  load: Callable[[], np.ndarray]  # returns the array in our layout.


def param_path(path: tuple) -> str:
  """``("layers", 0, "attn", "q_proj", "kernel")`` -> ``"layers/0/attn/q_proj/kernel"``."""
  return "/".join(str(p) for p in path)


def build_llama(config: LlamaConfig, sources: Mapping[str, Source]) -> Llama:
  """Builds ``Llama(config)`` whose every parameter is read from ``sources``.

  Args:
    config: the model's hyperparameters.
    sources: ``{param_path: Source}`` covering every parameter of the model.

  Returns:
    The model, parameters cast to ``config.param_dtype``; with ``config.scan_layers``, the
    per-layer tensors stacked (`jaxcomp.models.llama.scan_layers`).

  Raises:
    ValueError: naming the checkpoint tensor when one is missing or has the
      wrong shape.
  """
  if config.scan_layers:
    return scan_layers(build_llama(dataclasses.replace(config, scan_layers=False), sources))
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  for path, var in nnx.to_flat_state(state):
    key = param_path(path)
    if key not in sources:
      raise ValueError(f"checkpoint has no tensor for parameter {key!r}")
    src = sources[key]
    expected = var.get_value()
    value = np.asarray(src.load())
    if value.shape != tuple(expected.shape):
      raise ValueError(
          f"tensor {src.name!r} has shape {value.shape} in our layout, "
          f"expected {tuple(expected.shape)} for {key!r}")
    var.set_value(jnp.asarray(value, dtype=expected.dtype))
  return nnx.merge(graphdef, state)
