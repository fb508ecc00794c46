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

from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.quant.finite import check_finite


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


def _read(sources: Mapping[str, Source], key: str, shape: tuple[int, ...],
          origin: str = "") -> np.ndarray:
  """The tensor of parameter ``key``, checked against its expected ``shape`` and refused when
  it holds a NaN or inf (one pass over the host array, in chunks)."""
  if key not in sources:
    raise ValueError(f"checkpoint has no tensor for parameter {key!r}")
  src = sources[key]
  value = np.asarray(src.load())
  if value.shape != tuple(shape):
    raise ValueError(f"tensor {src.name!r} has shape {value.shape} in our layout, "
                     f"expected {tuple(shape)} for {key!r}")
  prefix = f"{origin}: " if origin else ""
  check_finite([(f"{prefix}tensor {src.name} (our {key})", value)],
               refuses="the loader refuses non-finite weights")
  return value


def build_llama(config: LlamaConfig, sources: Mapping[str, Source], *,
                origin: str = "") -> Llama:
  """Builds ``Llama(config)`` whose every parameter is read from ``sources``.

  Args:
    config: the model's hyperparameters.
    sources: ``{param_path: Source}`` covering every parameter of the model.
    origin: the checkpoint (a file or folder) named in the error for a non-finite tensor.

  Returns:
    The model, parameters cast to ``config.param_dtype``; with ``config.scan_layers``, each
    block parameter is the stack of its per-layer tensors (read one parameter at a time, so
    the blocks are never held twice).

  Raises:
    ValueError: naming the checkpoint tensor when one is missing, has the
      wrong shape, or holds a NaN or inf (with its first bad index, in our
      layout: ``model.gguf: tensor blk.0.attn_q.weight (our
      layers/0/attn/q_proj/kernel) has a non-finite value (nan) at index (3, 5);
      the loader refuses non-finite weights``).
  """
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  for path, var in nnx.to_flat_state(state):
    key = param_path(path)
    expected = var.get_value()
    if config.scan_layers and path[0] == "layers":  # stacked: read layer by layer, stack once
      rest = param_path(path[1:])
      value = np.empty(expected.shape, np.dtype(expected.dtype))
      for i in range(config.n_layers):
        value[i] = _read(sources, f"layers/{i}/{rest}", expected.shape[1:], origin)
    else:
      value = _read(sources, key, expected.shape, origin)
    var.set_value(jnp.asarray(value, dtype=expected.dtype))
  return nnx.merge(graphdef, state)
