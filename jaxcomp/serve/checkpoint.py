"""Saving and restoring packed (converted) models with Orbax, and their size on disk.

A packed model is saved as two Orbax items in one checkpoint directory: ``packed`` (the `QArray`
kernels: integer values, scales) and ``float`` (everything else: norms, unquantized layers,
smoothing vectors); for Linen, the packed variables of `jaxcomp.convert` are split the same
way. Sizes are read back from the bytes each item occupies on disk, so bits per
parameter are what was actually written, metadata included. Orbax writes to a temporary
directory and renames it when complete: a failed save leaves no half-written checkpoint.

A third item, ``manifest`` (JSON, written by the same commit), holds the SHA-256 of every
array's bytes (``{"packed/layers/0/mlp/up_proj/kernel/value/qvalue": {"dtype": "int4",
"shape": [...], "sha256": "..."}}``, whole arrays, computed at save from the values handed to
orbax). `restore_packed` hashes what it read and refuses a model whose bytes differ, naming the
array; a truncated or unreadable item is a one-line error naming the directory and the item.
An array this process does not hold all of (a multi-process save) has no digest
(``"sha256": null``) and is not checked. Models saved before manifests existed restore with a
warning.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcomp.layers import quant as qlayers
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import method_info
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import engine
from jaxcomp.rewrite.linen_quant import PackedParam
from jaxcomp.rewrite.nnx_quant import QUANT_HANDLERS, quant_layers
from jaxcomp.serve.packing import convert

__all__ = ["SavedSize", "packed_skeleton", "restore_packed", "save_packed"]


def _is_packed(path: Any, v: Any) -> bool:
  del path
  return isinstance(v, nnx.Variable) and isinstance(v.get_value(), QArray)


@dataclasses.dataclass(frozen=True)
class SavedSize:
  """Bytes a packed checkpoint occupies, and what they hold.

  Attributes:
    packed_bytes: on-disk bytes of the ``packed`` item (quantized kernels and their scales).
    float_bytes: on-disk bytes of the ``float`` item (all other parameters).
    packed_params: logical number of weights in the quantized kernels.
    float_params: number of other parameters.
  """

  packed_bytes: int
  float_bytes: int
  packed_params: int
  float_params: int

  @property
  def packed_bits_per_param(self) -> float:
    """Bits per weight of the quantized kernels, as saved (values + scales + metadata)."""
    return 8 * self.packed_bytes / max(self.packed_params, 1)

  @property
  def bits_per_param(self) -> float:
    """Bits per parameter of the whole model, as saved."""
    return 8 * (self.packed_bytes + self.float_bytes) / max(
        self.packed_params + self.float_params, 1)

  def to_dict(self) -> dict[str, float | int]:
    return {**dataclasses.asdict(self), "packed_bits_per_param": self.packed_bits_per_param,
            "bits_per_param": self.bits_per_param,
            "size_mb": (self.packed_bytes + self.float_bytes) / 1e6}


_ITEMS = ("packed", "float")
_MANIFEST_FORMAT = 1


def _leaves(tree: Any) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), x) for path, x in leaves]


def _sha256(x: Any) -> str | None:
  """SHA-256 of an array's bytes in C order; None for an array this process does not hold
  all of."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  a = np.ascontiguousarray(np.asarray(x)).reshape(-1)
  return hashlib.sha256(a.view(np.uint8)).hexdigest()


def _manifest(items: Mapping[str, Any]) -> dict[str, Any]:
  """``{"format", "hash", "arrays": {"<item>/<tree path>": {dtype, shape, sha256}}}``."""
  arrays = {}
  for item, tree in items.items():
    for path, x in _leaves(tree):
      arrays[f"{item}/{path}"] = {"dtype": str(np.dtype(x.dtype)), "shape": list(np.shape(x)),
                                  "sha256": _sha256(x)}
  return {"format": _MANIFEST_FORMAT, "hash": "sha256", "arrays": arrays}


def _verify(directory: pathlib.Path, restored: Mapping[str, Any],
            manifest: Mapping[str, Any]) -> None:
  """Raises a one-line ValueError naming the first array whose bytes differ from the
  manifest."""
  if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("hash") != "sha256":
    raise ValueError(f"restore_packed: {directory} has a manifest of an unknown format "
                     f"({manifest.get('format')!r}, {manifest.get('hash')!r})")
  arrays = manifest.get("arrays")
  if not isinstance(arrays, Mapping):
    raise ValueError(f"restore_packed: {directory} has a damaged manifest (no 'arrays')")
  for item in _ITEMS:
    for path, x in _leaves(restored[item]):
      name = f"{item}/{path}"
      entry = arrays.get(name)
      if not isinstance(entry, Mapping):
        raise ValueError(f"restore_packed: {directory}: {name} is not in its manifest")
      got = (str(np.dtype(x.dtype)), list(np.shape(x)))
      if (entry.get("dtype"), got[0]) == ("uint8", "int8") and name.endswith("values"):
        raise ValueError(f"restore_packed: {directory}: {name} holds 4-bit values in jaxcomp's "
                         "earlier uint8 nibble layout (before the offset low nibble of "
                         "pack_int4); convert and save the model again")
      if got != (entry.get("dtype"), entry.get("shape")):
        raise ValueError(f"restore_packed: {directory}: {name} was saved as {entry.get('dtype')}"
                         f"{tuple(entry.get('shape') or ())}, restored as {got[0]}{tuple(got[1])}")
      if entry.get("sha256") is not None and _sha256(x) != entry["sha256"]:
        raise ValueError(f"restore_packed: {directory} is corrupt: {name} differs from its "
                         "manifest digest (the file was changed after the save)")


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  graphdef, packed, other = nnx.split(model, _is_packed, ...)
  return graphdef, packed, other


def _split_linen(variables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Linen variables -> (the `PackedParam` kernels' QArrays, everything else), nested dicts."""

  def walk(tree):
    packed, other = {}, {}
    for key, value in tree.items():
      if isinstance(value, PackedParam):
        packed[key] = value.value
      elif isinstance(value, Mapping):
        p, o = walk(value)
        if p:
          packed[key] = p
        if o:
          other[key] = o
      else:
        other[key] = value
    return packed, other

  return walk(variables)


def _merge_linen(packed: Mapping[str, Any], other: Mapping[str, Any],
                 like: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `_split_linen`: the QArrays boxed back into ``like``'s `PackedParam` boxes
  (their logical names and stack axis)."""
  out = {key: dict(value) if isinstance(value, Mapping) else value
         for key, value in other.items()}
  for key, value in packed.items():
    if isinstance(value, Mapping):
      out[key] = _merge_linen(value, out.get(key, {}), like[key])
    else:
      out[key] = like[key].replace(value=value)
  return out


def _pure_parts(model: Any, fn: str) -> tuple[Any, Any, Any]:
  """``(graphdef or None, packed pure tree, float pure tree)`` of an NNX model or Linen variables."""
  if isinstance(model, nnx.Module):
    graphdef, packed, other = _split(model)
    return graphdef, nnx.to_pure_dict(packed), nnx.to_pure_dict(other)
  if isinstance(model, Mapping):
    return (None,) + _split_linen(model)
  raise TypeError(f"{fn}: expected a converted NNX model or Linen variables, got "
                  f"{type(model).__name__}")


def save_packed(model: nnx.Module | Mapping[str, Any], directory: str | os.PathLike) -> SavedSize:
  """Saves a packed model (from `jaxcomp.convert`) to ``directory`` (must not exist).

  Args:
    model: a converted NNX model, or the packed variables of a converted Linen module.
    directory: checkpoint directory to create.

  Returns:
    The `SavedSize` read back from disk.

  Example::

    size = jc.save_packed(jc.convert(qmodel), "/tmp/smollm2_w4g128")
    size.packed_bits_per_param
    4.26...
    module, packed_vars = jc.convert(qmodule, variables=qvars, args=(x,))      # Linen
    jc.save_packed(packed_vars, "/tmp/linen_w4")
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"save_packed: {directory} already exists")
  _, packed, other = _pure_parts(model, "save_packed")
  if not jax.tree.leaves(packed):
    raise ValueError("save_packed: the model has no packed kernels; run jc.convert first")
  manifest = _manifest({"packed": packed, "float": other})  # from the values orbax gets
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(directory, ocp.args.Composite(
        packed=ocp.args.StandardSave(packed), float=ocp.args.StandardSave(other),
        manifest=ocp.args.JsonSave(manifest)))
  count = lambda s: int(sum(
      v.size if isinstance(v, QArray) else np.size(v)
      for v in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, QArray))))
  return SavedSize(packed_bytes=_dir_bytes(directory / "packed"),
                   float_bytes=_dir_bytes(directory / "float"),
                   packed_params=count(packed), float_params=count(other))


def packed_skeleton(model: nnx.Module, recipe: Recipe) -> nnx.Module:
  """The packed form `jaxcomp.convert` gives for ``model`` quantized by ``recipe`` (any method),
  with placeholder values: the target structure for `restore_packed`.

  Run it under `nnx.eval_shape` to allocate nothing.

  Example::

    like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(cfg, rngs=nnx.Rngs(0)), recipe))
  """
  as_rtn = Recipe([r if r.quant is None else dataclasses.replace(
      r, quant=dataclasses.replace(r.quant, method="rtn", options={}, learn_scale=False))
      for r in recipe.rules])
  new, _ = engine.rewrite(model, as_rtn, handlers=QUANT_HANDLERS,
                               kind=lambda r: r.quant, strict=False)
  for layer in quant_layers(new):
    rule = engine.rule_for(new, recipe, layer.path, layer.module)
    if rule is not None and rule.quant is not None:
      layer.hook.spec = rule.quant
      if method_info("quant", rule.quant.method).smooths_inputs:
        k = int(np.prod([getattr(layer.module, layer.kernel_name)[...].shape[a]
                         for a in layer.contracting]))
        layer.hook.in_scale = qlayers.SmoothScale(jax.numpy.ones((k,), jax.numpy.float32))
  return convert(new)


# tensorstore's errors for unreadable data start with an absl status code: DATA_LOSS, ...
_STORAGE_ERROR = re.compile(r"[A-Z][A-Z_]+: ")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def restore_packed(directory: str | os.PathLike, like: Any) -> Any:
  """Restores a model saved by `save_packed` into the structure of ``like``.

  Args:
    directory: the checkpoint directory.
    like: a model of the same packed structure (e.g. ``nnx.eval_shape`` of `packed_skeleton`),
      or, for Linen, packed variables of the same structure (abstract ones will do).

  Returns:
    The restored packed model, or the restored Linen variables.

  Raises:
    ValueError: one line, when ``directory`` is not a packed checkpoint, does not match
      ``like``, cannot be read (a truncated or damaged item, named), or holds an array whose
      bytes differ from the manifest written at save (the array is named).

  Example::

    like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(cfg, rngs=nnx.Rngs(0)), recipe))
    packed = jc.restore_packed("/tmp/smollm2_w4g128", like)
    like = jax.eval_shape(lambda: jc.convert(qmodule, variables=qvars, args=(x,))[1])  # Linen
    packed_vars = jc.restore_packed("/tmp/linen_w4", like)
  """
  directory = pathlib.Path(directory).absolute()
  for item in _ITEMS:
    if not (directory / item).is_dir():
      raise ValueError(f"restore_packed: {directory} is not a packed checkpoint (no {item!r} item)")
  graphdef, packed, other = _pure_parts(like, "restore_packed")
  as_abstract = lambda s: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None)), s)  # placed like ``like``
  targets = {"packed": as_abstract(packed), "float": as_abstract(other)}
  restored = {}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    for item, args in [(item, ocp.args.StandardRestore(targets[item])) for item in _ITEMS] + (
        [("manifest", ocp.args.JsonRestore())] if (directory / "manifest").is_dir() else []):
      try:  # one item at a time, so that an error names it
        restored[item] = ckpt.restore(directory, ocp.args.Composite(**{item: args}))[item]
      except Exception as e:  # pylint: disable=broad-except
        if isinstance(e, ValueError) and not _STORAGE_ERROR.match(_first_line(e)) and not (
            isinstance(e, json.JSONDecodeError)):  # orbax: another tree, shape or dtype
          raise ValueError(f"restore_packed: {directory} does not match the model (item "
                           f"{item!r}): {_first_line(e)}") from None
        # truncated or damaged files: tensorstore status errors, bad JSON, missing keys, ...
        raise ValueError(f"restore_packed: {directory}: item {item!r} cannot be read (truncated "
                         f"or corrupt: {_first_line(e)})") from None
  if "manifest" in restored:
    _verify(directory, restored, restored["manifest"])
  else:
    logging.warning("restore_packed: %s has no integrity manifest (saved before jaxcomp wrote "
                    "them): restored unverified", directory)
  if graphdef is None:
    return _merge_linen(restored["packed"], restored["float"], like)
  _, packed_state, other_state = _split(like)
  nnx.replace_by_pure_dict(packed_state, restored["packed"])
  nnx.replace_by_pure_dict(other_state, restored["float"])
  return nnx.merge(graphdef, packed_state, other_state)

