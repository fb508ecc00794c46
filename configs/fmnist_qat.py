"""Fashion-MNIST quantization-aware training of a small CNN: float and quantized, same seed.

Run (after `make data`, which prepares Fashion-MNIST from the Debian package):

  python -m jaxcomp --config configs/fmnist_qat.py:w4a8_lsq --workdir runs/fmnist/w4a8_lsq

Variants: float, w8a8, w8a8_lsq, w4a8, w4a8_lsq, w4, w4_lsq. Append ",tiny" for the
test-sized run (tiny CNN, three epochs), e.g. ``configs/fmnist_qat.py:w8a8,tiny``. Any field can
be overridden: ``--config.train.epochs=3 --config.data.data_dir=/data/tfds``.

w8a8 runs int8 weights (per channel) and int8 activations (per token / per example) with the
dense layers' forward and backward dots in int8; w4a8 has 4-bit weights; "_lsq" learns the
weight step sizes (Esser et al., 2020). Convolutions are fake-quantized (float convolution).
"""

import os

import ml_collections

import jaxcomp as jc

VARIANTS = {
    "float": None,
    "w8a8": jc.Quant(w_bits=8, a_bits=8, g_bits=8),
    "w8a8_lsq": jc.Quant(w_bits=8, a_bits=8, g_bits=8, learn_scale=True),
    "w4a8": jc.Quant(w_bits=4, a_bits=8),
    "w4a8_lsq": jc.Quant(w_bits=4, a_bits=8, learn_scale=True),
    "w4": jc.Quant(w_bits=4),
    "w4_lsq": jc.Quant(w_bits=4, learn_scale=True),
}

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def get_config(arg: str = "float") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, *mods = arg.split(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of fmnist_qat.py (variants: "
                     f"{', '.join(VARIANTS)})")
  unknown = [m for m in mods if m != "tiny"]
  if unknown:
    raise ValueError(f"unknown modifier {unknown[0]!r} of fmnist_qat.py (modifiers: tiny)")
  tiny = "tiny" in mods

  config = ml_collections.ConfigDict()
  config.task = "image_classification"
  config.seed = 0
  config.model = dict(name="cnn", size="tiny" if tiny else "default")
  config.data = dict(name="fashion_mnist", data_dir=os.environ.get("TFDS_DATA_DIR", DEFAULT_DATA_DIR),
                     batch_size=32 if tiny else 128, eval_batch_size=1000, cache=True)
  config.train = dict(
      epochs=3 if tiny else 4,
      lr=2e-3,
      warmup_steps=2 if tiny else 200,
      weight_decay=1e-4,
      grad_clip=1.0,
      log_every=2 if tiny else 100,
      checkpoint_every=4 if tiny else 1000,
      keep_checkpoints=3,
      progress=not tiny,
  )
  config.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=None)
  quant = VARIANTS[variant]
  recipe = None if quant is None else jc.Recipe([jc.Rule(r".*", quant=quant, name="all")])
  config.recipe = None if recipe is None else recipe.to_config()
  return config
