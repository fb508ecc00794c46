"""Fashion-MNIST CNN trained with gradual block sparsity (Zhu & Gupta's cubic schedule).

Run (after `make data`):

  python -m jaxcomp --config configs/fmnist_sparse.py:block16_90 --workdir runs/fmnist/block16_90

Variants: dense (the same run without sparsity, for comparison), block16_90 and block32_90
(90% of the 16x16 / 32x32 tiles of ``conv2`` (viewed as (kh kw cin, cout)) and ``fc1``
pruned by magnitude; the first conv and the classifier stay dense, as is usual). The masks
live in the optimizer state (`jaxcomp.sparse.sparsify`): sparsity ramps from 0 at 10% of the
run to 90% at 60%, masks updated every 50 steps, then frozen while training goes on. The
report adds the measured sparsity of the pruned kernels. Append ",tiny" for the test-sized run.
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.ptq.job import parse_variant
from jaxcomp.train.tasks import fmnist_config

VARIANTS = {
    "dense": None,
    "block16_90": jc.Sparsity("block", sparsity=0.9, block=(16, 16)),
    "block32_90": jc.Sparsity("block", sparsity=0.9, block=(32, 32)),
}


def get_config(arg: str = "block16_90") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "fmnist_sparse.py")
  config = fmnist_config(tiny=tiny)
  config.train.sparsity = dict(begin=0.1, end=0.6, update_every=2 if tiny else 50,
                               score="magnitude")
  spec = VARIANTS[variant]
  if spec is not None:
    if tiny:  # the tiny CNN's conv2 has 16 outputs
      spec = jc.Sparsity("block", sparsity=spec.sparsity, block=(8, 8))
    config.recipe = jc.Recipe([jc.Rule(r"conv2|fc1", sparsity=spec, name="blocks")]).to_config()
  return config
