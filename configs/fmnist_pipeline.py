"""The stage pipeline on the image task: a Fashion-MNIST CNN trained, pruned, distilled, QAT'd.

Run (after `make data`):

  python -m jaxcomp --config configs/fmnist_pipeline.py --workdir runs/fmnist_pipeline

Stages (``config.stages``; each a section of ``config.stage``):

1. ``dense``: the CNN (256-wide ``fc1``) trained from its initialisation, cross-entropy, 4 epochs:
   the teacher of the later stages and the evaluation baseline (``config.eval.baseline``);
2. ``prune``: 90% of ``fc1``'s 16x16 tiles removed one-shot by magnitude (``fc1`` holds 401k of
   the 409k weights);
3. ``kd``: distillation from ``dense`` (KL at T=4, alpha 0.7), 2 epochs, the pruned tiles kept
   at zero;
4. ``qat``: the QAT rewrite, 4-bit weights per output channel and 8-bit per-tensor activations
   (w4a8) on the convolutions and both dense layers;
5. ``kd_q``: distillation from ``dense`` again, now through the fake-quantized model, 1 epoch;
6. ``convert``: packed int4 weights; 7. ``eval``: the harness on the test split (accuracy,
   balanced accuracy, macro-F1, ECE, size, latency, robustness to Gaussian noise and shifts,
   scores against ``dense``).

Variants: ``p_kd_q`` (the list above, default) and ``q_only`` (dense -> qat -> kd_q ->
convert -> eval). ",tiny" runs the same stages on the tiny CNN (8x8 tiles, short epochs) for
tests.
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.variants import parse_variant
from jaxcomp.train.tasks import fmnist_config

VARIANTS = {
    "p_kd_q": "dense,prune,kd,qat,kd_q,convert,eval",
    "q_only": "dense,qat,kd_q,convert,eval",
}


def get_config(arg: str = "p_kd_q") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "fmnist_pipeline.py")
  base = fmnist_config(tiny=tiny)
  config = ml_collections.ConfigDict()
  config.task = "pipeline"
  config.seed = 0
  config.model = base.model.to_dict()
  if not tiny:
    config.model.hidden_dim = 256
  config.data = base.data.to_dict()
  config.mesh = base.mesh.to_dict()
  config.calib = dict(n_seq=0, batch_size=64, dtype="float32")  # magnitude: no calibration
  config.eval = dict(split="test", max_images=0, batch_size=500, baseline="dense",
                     noise=(0.1, 0.2), shifts=(1, 2), latency_repeats=2 if tiny else 5)

  def training(epochs):
    t = base.train.to_dict()
    t.update(epochs=epochs, steps=0)
    return t

  quant = jc.Quant(w_bits=4, a_bits=8, a_granularity="tensor")
  config.stage = dict(
      dense=dict(kind="train", train=training(2 if tiny else 4)),
      prune=dict(kind="prune", recipe=jc.Recipe([jc.Rule(r"fc1", name="tiles", sparsity=jc.Sparsity(
          "block", sparsity=0.9, block=(8, 8) if tiny else (16, 16)))]).to_config()),
      kd=dict(kind="distill", teacher="dense", distill=dict(alpha=0.7, temperature=4.0),
              train=training(1 if tiny else 2)),
      qat=dict(kind="quantize", recipe=jc.Recipe([jc.Rule(r"conv\d|fc\d", name="w4a8",
                                                          quant=quant)]).to_config()),
      kd_q=dict(kind="distill", teacher="dense", distill=dict(alpha=0.7, temperature=4.0),
                train=training(1)),
      convert=dict(kind="convert", save_packed=True),
      eval=dict(kind="eval"),
  )
  config.stages = VARIANTS[variant]
  config.redo = False
  return config
