"""Every docstring example of the numerics, recipe, layer and kernel modules runs and prints
what it says."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxcomp as jc

MODULES = [
    "jaxcomp.quant.core",
    "jaxcomp.quant.dot",
    "jaxcomp.quant.qarray",
    "jaxcomp.quant.spec",
    "jaxcomp.quant.finite",
    "jaxcomp.quant.formats",
    "jaxcomp.quant.hadamard",
    "jaxcomp.quantizers.gptq_core",
    "jaxcomp.quantizers.awq_core",
    "jaxcomp.quantizers.smoothquant_core",
    "jaxcomp.pruners.sparsegpt_core",
    "jaxcomp.pruners.magnitude",
    "jaxcomp.factorizers.svd",
    "jaxcomp.oneshot.registry",
    "jaxcomp.oneshot.solver",
    "jaxcomp.oneshot.pipeline",
    "jaxcomp.oneshot.calibrate",
    "jaxcomp.rewrite.engine",
    "jaxcomp.rewrite.nnx_quant",
    "jaxcomp.rewrite.delayed",
    "jaxcomp.eval.size",
    "jaxcomp.experiments.variants",
    "jaxcomp.sparse.spec",
    "jaxcomp.sparse.block_sparse",
    "jaxcomp.sparse.training",
    "jaxcomp.lowrank.core",
    "jaxcomp.lowrank.spec",
    "jaxcomp.layers.lowrank",
    "jaxcomp.serve.packing",
    "jaxcomp.rewrite.linen_quant",
    "jaxcomp.sparse.masks",
    "jaxcomp.sparse.scores",
    "jaxcomp.recipe",
    "jaxcomp.layers.quant",
    "jaxcomp.distill.losses",
    "pallas_kernels.tiling",
    "pallas_kernels.int8_matmul",
    "pallas_kernels.int4_matmul",
    "pallas_kernels.block_sparse_matmul",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  globs = {**vars(module), "jc": jc, "jax": jax, "jnp": jnp, "nnx": nnx}
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, globs=globs, optionflags=flags, verbose=False)
  assert result.attempted > 0
  assert result.failed == 0
