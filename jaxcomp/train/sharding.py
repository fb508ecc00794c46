"""Meshes and shardings from logical axis names (one rules table, first match wins).

Model params carry logical axis names (``("embed", "mlp")``); a rules table maps each name to
a mesh axis (or a tuple of them) or None (replicated). The mesh has three axes:

* ``data``: batch split, everything else replicated (plain data parallelism);
* ``fsdp``: batch split *and* params, gradients and optimizer state split along their
  ``embed`` dimension (ZeRO-3 / FSDP: each device holds 1/fsdp of the state, XLA all-gathers
  a weight just before it is used and reduce-scatters its gradient);
* ``tensor``: Megatron-style: attention heads, FFN channels and the vocabulary split.

``config.mesh.rules`` is a preset name (`RULE_PRESETS`: "data_parallel", "fsdp",
"fsdp_tensor") or an explicit list of ``(logical name, mesh axis)`` pairs. Optimizer state and
training-time sparsity masks are sharded like the params they mirror (matched by tree path
and shape); activations are constrained inside the model by ``act_*`` names
(`activation_rules`, `jaxcomp.models.constrain`).

    >>> rules("fsdp")["embed"]
    'fsdp'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcomp.models import partitioning as axes_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension of inputs and activations

_PARAM_NAMES = ("vocab", "embed", "q_heads", "kv_heads", "mlp", "norm", "conv_in", "conv_out",
                "classes", "layers")  # layers: the stack axis of scanned layers, never sharded
# Activation names (used by `constrain` inside models): batch, sequence, hidden.
_ACT_NAMES = ("act_batch", "act_seq", "act_embed", "act_mlp", "act_heads", "act_vocab")

RULE_PRESETS: dict[str, dict[str, Any]] = {
    "data_parallel": {**{n: None for n in _PARAM_NAMES + _ACT_NAMES}, "act_batch": BATCH},
    "fsdp": {**{n: None for n in _PARAM_NAMES + _ACT_NAMES}, "act_batch": BATCH,
             "embed": "fsdp", "conv_out": "fsdp"},
    "fsdp_tensor": {**{n: None for n in _PARAM_NAMES + _ACT_NAMES}, "act_batch": BATCH,
                    "embed": "fsdp", "conv_out": "fsdp", "vocab": "tensor",
                    "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                    "act_mlp": "tensor", "act_heads": "tensor", "act_vocab": "tensor"},
}


def make_mesh(cfg: ml_collections.ConfigDict,
              devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor) sized by ``cfg.shape`` (-1: the remaining devices).

  Uses every device of every process (``jax.devices()``), so the same config runs on one
  CPU, 8 simulated devices or a TPU pod slice; ``devices`` replaces them (the compile-only
  devices of `jaxcomp.aot.Target` for a dry run).

  Raises:
    ValueError: an unknown axis, more than one -1, or sizes that do not multiply to the
      device count (the message gives both).

  Example:
    >>> make_mesh(ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}}))
  """
  shape = dict(cfg.shape)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.shape has no axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  n = jax.device_count() if devices is None else len(devices)
  if sizes.count(-1) > 1:
    raise ValueError("mesh.shape: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh.shape {shape} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh.shape {shape} needs {int(np.prod(sizes))} devices, {n} are present")
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=types)
  except NotImplementedError as e:  # jax's TPU device-mesh builder: an axis size that no set
    if "allow_split_physical_axes" not in str(e):  # of whole torus axes makes
      raise
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  logging.warning("mesh.shape %s does not map onto the TPU torus without splitting physical "
                  "axes; splitting them (collectives may be slower)", shape)
  grid = mesh_utils.create_device_mesh(tuple(sizes), devices or jax.devices(),
                                       allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def rules(spec: Any = None) -> dict[str, Any]:
  """The rules table of ``spec``: a preset name, a list of (name, axis) pairs, or None
  (data parallel).

  Raises:
    ValueError: an unknown preset, or a mesh axis that is not data / fsdp / tensor.
  """
  if spec is None:
    return dict(RULE_PRESETS["data_parallel"])
  if isinstance(spec, str):
    if spec not in RULE_PRESETS:
      raise ValueError(f"mesh.rules must be one of {', '.join(RULE_PRESETS)} or a list of "
                       f"(logical axis, mesh axis) pairs; got {spec!r}")
    return dict(RULE_PRESETS[spec])
  table = {}
  for pair in spec:
    name, axis = pair
    axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    for a in (axis if isinstance(axis, tuple) else (axis,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"mesh.rules maps {name!r} to {a!r}, not a mesh axis "
                         f"({', '.join(MESH_AXES)})")
    table.setdefault(str(name), axis)  # first match wins
  return table


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh,
             table: dict[str, Any], what: str) -> P:
  """The PartitionSpec of an array with logical ``names``; checks rules and divisibility."""
  axes = []
  for dim, name in zip(shape, names):
    if name is None:
      axes.append(None)
      continue
    if name not in table:
      raise ValueError(f"{what}: logical axis {name!r} has no sharding rule (mesh.rules)")
    axis = table[name]
    if dim % axes_lib.axis_size(mesh, axis):
      raise ValueError(f"{what}: dimension {name!r} of size {dim} does not divide over mesh "
                       f"axis {axis!r} of size {axes_lib.axis_size(mesh, axis)}")
    axes.append(axis)
  return P(*axes)


def _path_str(path: tuple[Any, ...]) -> tuple[str, ...]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    if name in ("value", "raw_value"):
      continue
    out.append(str(name))
  return tuple(out)


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh, rules_spec: Any = None) -> Any:
  """NamedShardings of ``params`` from their ``out_sharding`` logical names via the rules.

  Raises:
    ValueError: a param names a logical axis that no rule maps, or a sharded dimension does
      not divide over its mesh axis (the param and the axis are named).
  """
  table = rules(rules_spec)

  def one(path, var):
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if not names:
      return NamedSharding(mesh, P())
    shape = var.get_value().shape if isinstance(var, nnx.Variable) else np.shape(var)
    return NamedSharding(mesh, spec_for(tuple(names), tuple(shape), mesh, table,
                                        "/".join(_path_str(path))))

  return jax.tree.map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def like_params(tree: Any, params: Any, shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for ``tree`` (e.g. an optimizer state) whose leaves mirror ``params``: a leaf
  whose tree path ends with a param's path and has its shape gets that param's sharding;
  every other leaf (step counts, scalars) is replicated."""
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
  for (path, p), s in zip(jax.tree.leaves_with_path(params),
                          jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
                              x, NamedSharding))):
    by_path[_path_str(path)] = (np.shape(p), s)
  depths = sorted({len(k) for k in by_path}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    key = _path_str(path)
    for d in depths:
      hit = by_path.get(key[-d:]) if len(key) >= d else None
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return replicated

  return jax.tree.map_with_path(one, tree)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules_spec: Any = None) -> Any:
  """Shardings for a `TrainState`: params by their names, optimizer state (moments,
  sparsity masks and scores) like the params it mirrors, everything else replicated."""
  params = param_shardings(state.params, mesh, rules_spec)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state)
  return shardings._replace(params=params,
                            opt_state=like_params(state.opt_state, state.params, params, mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data`` and ``fsdp``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH))


@contextlib.contextmanager
def activation_rules(mesh: jax.sharding.Mesh, rules_spec: Any = None) -> Iterator[None]:
  """While active (when a step is traced), models pin their activations to ``mesh`` by the
  rules' ``act_*`` names (`jaxcomp.models.constrain`).

  Example::

    with activation_rules(mesh, "fsdp"):
      state, metrics = train_step(state, batch)    # traced here
  """
  with axes_lib.activation_context(mesh, rules(rules_spec)):
    yield
