"""Meshes and shardings from logical names; the optimizer."""

import jax
import ml_collections
import pytest
from flax import nnx

from jaxcomp.models import Llama, LlamaConfig
from jaxcomp.train import make_optimizer
from jaxcomp.train import sharding as sh


def _mesh_cfg(**shape):
  return ml_collections.ConfigDict({"shape": shape})


def test_mesh_shapes_and_errors():
  n = jax.device_count()
  assert sh.make_mesh(_mesh_cfg(data=-1)).shape["data"] == n
  assert dict(sh.make_mesh(_mesh_cfg(data=-1, tensor=2)).shape) == {"data": n // 2, "fsdp": 1,
                                                                    "tensor": 2}
  with pytest.raises(ValueError, match=f"needs {3 * n} devices, {n} are present"):
    sh.make_mesh(_mesh_cfg(data=n, tensor=3))
  with pytest.raises(ValueError, match="mesh.shape has no axis 'model'"):
    sh.make_mesh(_mesh_cfg(model=2))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sh.make_mesh(_mesh_cfg(data=-1, fsdp=-1))


def test_param_shardings_follow_rules_and_name_missing_axes():
  mesh = sh.make_mesh(_mesh_cfg(data=-1))
  _, params, _ = nnx.split(Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param, ...)
  shardings = sh.param_shardings(params, mesh)  # data parallel: everything replicated
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  rules = [("vocab", "data"), ("embed", None)]
  with pytest.raises(ValueError, match=r"logical axis '\w+' has no sharding rule"):
    sh.param_shardings(params, mesh, rules)


def test_optimizer_rejects_warmup_longer_than_run():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, weight_decay=0.0, grad_clip=1.0))
  with pytest.raises(ValueError, match=r"train.warmup_steps=10 must be in \[0, 8\)"):
    make_optimizer(cfg, total_steps=8)
