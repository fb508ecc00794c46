"""Fashion-MNIST CNN trained with gradual block sparsity (Zhu & Gupta's cubic schedule).

Run (after `make data`), or all variants side by side with `python bench/fmnist_sparse.py`:

  python -m jaxcomp --config configs/fmnist_sparse.py:block16_90 --workdir runs/fmnist/block16_90

The CNN has a 256-wide ``fc1`` (a (7 * 7 * 32, 256) kernel: 401k of the model's 409k weights)
and trains 8 epochs. Variants: dense (the same run without sparsity, for comparison),
block16_90 and block32_90 (90% of the 16x16 / 32x32 tiles of ``fc1`` pruned by magnitude: 88%
of all the model's weights). The convolutions (5k weights; conv2 is a (3 * 3 * 16, 32) matrix
of only 18 16x16 tiles) and the classifier stay dense, as is usual. The masks live in the
optimizer state (`jaxcomp.sparse.sparsify`): sparsity ramps from 0 at 10% of the run to 90% at
60%, masks updated every 50 steps, then frozen while training goes on. The report adds the
measured sparsity of the pruned kernel. Append ",tiny" for the test-sized run (tiny CNN, 8x8
tiles).
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.variants import parse_variant
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
  if not tiny:
    config.model.hidden_dim = 256
    config.train.epochs = 8
  config.train.sparsity = dict(begin=0.1, end=0.6, update_every=2 if tiny else 50,
                               score="magnitude")
  spec = VARIANTS[variant]
  if spec is not None:
    if tiny:  # the tiny CNN's fc1 is (784, 32)
      spec = jc.Sparsity("block", sparsity=spec.sparsity, block=(8, 8))
    config.recipe = jc.Recipe([jc.Rule(r"fc1", sparsity=spec, name="blocks")]).to_config()
  return config
