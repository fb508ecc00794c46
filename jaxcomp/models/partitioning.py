"""Logical-axis metadata shared by the models in this package.

Every parameter of a jaxcomp model carries its logical axis names (one name,
or ``None``, per dimension) as the ``out_sharding`` metadata of its
``nnx.Variable``. A rules table resolves them to mesh axes later, e.g.::

  with nnx.logical_axis_rules((("embed", None), ("mlp", "model"))):
    specs = nnx.get_partition_spec(nnx.state(model))   # PartitionSpecs

Eager sharding is switched off per Variable (``eager_sharding=False``), so a
model can be built with or without a mesh in context; the owner of the mesh
shards the state explicitly (``jax.device_put`` / ``jit`` out_shardings).
"""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def axes(*names: str | None) -> Mapping[str, Any]:
  """Variable metadata giving a parameter its logical axis names.

  Args:
    *names: one logical name (or ``None`` for "never sharded") per dimension.

  Returns:
    A mapping to pass as ``kernel_metadata`` / ``embedding_metadata`` /
    ``scale_metadata`` or as ``**kwargs`` to ``nnx.Param``.

  Example::

    nnx.Linear(4, 8, rngs=rngs, kernel_metadata=axes("embed", "mlp"))
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


_ACTIVATIONS: contextvars.ContextVar[tuple[jax.sharding.Mesh, Mapping[str, Any]] | None] = (
    contextvars.ContextVar("jaxcomp_activation_rules", default=None))


@contextlib.contextmanager
def activation_context(mesh: jax.sharding.Mesh, table: Mapping[str, Any]) -> Iterator[None]:
  """Makes `constrain` pin activations to ``mesh`` via ``table`` (logical name -> mesh axis)
  for code traced inside; `jaxcomp.train.sharding.activation_rules` builds the table."""
  token = _ACTIVATIONS.set((mesh, table))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """``x`` with a sharding constraint from logical activation ``names`` (one per dim).

  Outside `activation_context` (eager use, single device) ``x`` is returned unchanged; a
  dimension its mesh axis does not divide (a batch of 1 at evaluation) stays unsharded.

  Example:
    >>> constrain(jnp.ones((2, 3)), "act_batch", "act_embed").shape
    (2, 3)
  """
  ctx = _ACTIVATIONS.get()
  if ctx is None:
    return x
  mesh, table = ctx
  parts = []
  for dim, name in zip(x.shape, names):
    axis = table.get(name) if name is not None else None
    parts.append(axis if axis is not None and dim % axis_size(mesh, axis) == 0 else None)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))


def shards(name: str) -> int:
  """How many ways the active `activation_context` splits logical activation axis ``name``
  (1 outside one).

  Example:
    >>> shards("act_batch")
    1
  """
  ctx = _ACTIVATIONS.get()
  return 1 if ctx is None else axis_size(ctx[0], ctx[1].get(name))


def axis_size(mesh: jax.sharding.Mesh, axis: str | tuple[str, ...] | None) -> int:
  """Devices along a mesh axis, a tuple of axes (their product) or None (1)."""
  if axis is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
