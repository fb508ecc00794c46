"""Fashion-MNIST quantization-aware training of a small CNN: float and quantized, same seed.

Run (after `make data`, which prepares Fashion-MNIST from the Debian package):

  python -m jaxcomp --config configs/fmnist_qat.py:w4a8_lsq --workdir runs/fmnist/w4a8_lsq

Variants: float, w8a8, w8a8_lsq, w8a8_delayed, w4a8, w4a8_lsq, w4, w4_lsq. Append ",tiny" for the
test-sized run (tiny CNN, three epochs), e.g. ``configs/fmnist_qat.py:w8a8,tiny``. Any field can
be overridden: ``--config.train.epochs=3 --config.data.data_dir=/data/tfds``.

w8a8 runs int8 weights (per channel) and int8 activations (per token / per example) with the
dense layers' forward and backward dots in int8; w4a8 has 4-bit weights; "_lsq" learns the
weight step sizes (Esser et al., 2020). Convolutions are fake-quantized (float convolution).
w8a8_delayed scales the dense layers' activations and gradients per tensor from the absmax of
the last 16 steps (delayed scaling; the loop fills the histories before the first step), the
convolutions as w8a8.
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.variants import parse_variant
from jaxcomp.train.tasks import fmnist_config

VARIANTS = {
    "float": None,
    "w8a8": jc.Quant(w_bits=8, a_bits=8, g_bits=8),
    "w8a8_lsq": jc.Quant(w_bits=8, a_bits=8, g_bits=8, learn_scale=True),
    "w8a8_delayed": jc.Quant(w_bits=8, a_bits=8, g_bits=8, a_granularity="tensor",
                             scaling="delayed"),
    "w4a8": jc.Quant(w_bits=4, a_bits=8),
    "w4a8_lsq": jc.Quant(w_bits=4, a_bits=8, learn_scale=True),
    "w4": jc.Quant(w_bits=4),
    "w4_lsq": jc.Quant(w_bits=4, learn_scale=True),
}

def get_config(arg: str = "float") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "fmnist_qat.py")
  config = fmnist_config(tiny=tiny)
  quant = VARIANTS[variant]
  if quant is not None and quant.scaling == "delayed":  # convolutions have no int8 dot
    recipe = jc.Recipe([jc.Rule(r"conv\d", quant=VARIANTS["w8a8"], name="conv"),
                        jc.Rule(r"fc\d", quant=quant, name="dense")])
  else:
    recipe = None if quant is None else jc.Recipe([jc.Rule(r".*", quant=quant, name="all")])
  config.recipe = None if recipe is None else recipe.to_config()
  return config
