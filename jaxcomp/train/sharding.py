"""Meshes and shardings from logical axis names (one rules table, first match wins).

Model params carry logical axis names (``("embed", "mlp")``); a rules table maps each name to a
mesh axis or None (replicated). Data parallelism is the default table: every name replicated,
the batch split over ``data``. The FSDP / tensor tables arrive with the distillation issue;
they only change the table.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel: every logical axis replicated.
DATA_PARALLEL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", None), ("embed", None), ("q_heads", None), ("kv_heads", None), ("mlp", None),
    ("norm", None), ("conv_in", None), ("conv_out", None), ("classes", None),
)


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor) sized by ``cfg.shape`` (-1: the remaining devices).

  Example:
    >>> make_mesh(ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}}))
  """
  shape = dict(cfg.shape)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.shape has no axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError("mesh.shape: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh.shape {shape} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh.shape {shape} needs {int(np.prod(sizes))} devices, {n} are present")
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _rules(rules: Any) -> tuple[tuple[str, Any], ...]:
  if rules is None:
    return DATA_PARALLEL_RULES
  return tuple((str(k), None if v is None else (tuple(v) if isinstance(v, (list, tuple)) else v))
               for k, v in rules)


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
  """NamedShardings of ``params`` from their ``out_sharding`` logical names via ``rules``.

  Raises:
    ValueError: a param names a logical axis that no rule maps (the name is given).
  """
  table = dict(_rules(rules))

  def one(var):
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if not names:
      return NamedSharding(mesh, P())
    missing = [n for n in names if n is not None and n not in table]
    if missing:
      raise ValueError(f"logical axis {missing[0]!r} has no sharding rule (mesh.rules)")
    return NamedSharding(mesh, P(*(None if n is None else table[n] for n in names)))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
  """Shardings for a `TrainState`: params by their names, every other leaf replicated.

  (Optimizer moments are replicated under data parallelism; FSDP shards them like params.)
  """
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state)
  return shardings._replace(params=param_shardings(state.params, mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data`` (and ``fsdp``), the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


