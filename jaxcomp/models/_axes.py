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

from collections.abc import Mapping
from typing import Any


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
