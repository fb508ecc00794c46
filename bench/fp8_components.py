"""Where fp8 W8A8's perplexity goes on SmolLM2-135M: the E4M3 weights and the E4M3 activations
apart, against the int8 grids (issue 20's +1% target for fp8 W8A8).

Every row quantizes the 210 projections, by round to nearest with `jc.quantize` (no
calibration: the element formats alone) unless it says GPTQ (`jc.ptq`), as fake quant (the
numerics `jc.convert` serves bit for bit), and scores the first ``--max_tokens`` tokens of
WikiText-2 test in 512-token windows:

* float; int8 weights only; E4M3 weights only (per output channel);
* int8 W8A8 and E4M3 W8A8 (activations per token);
* int8 weights with E4M3 activations, E4M3 weights with int8 activations;
* E4M3 activations on one family of projections at a time (int8 weights elsewhere too);
* GPTQ on the E4M3 grid (act-order, ``--n_calib`` windows of WikiText-2 valid), weights only
  and W8A8;
* after QuaRot's randomized Hadamard rotations (`rotate_llama`): int8 W8A8, E4M3 weights
  only, int8 weights with E4M3 activations, E4M3 W8A8 (RTN and GPTQ).

    python bench/fp8_components.py --max_tokens 8192
    python bench/fp8_components.py --max_tokens 8192 --rows rotated   # the rotated rows only
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import numpy as np

import jaxcomp as jc
from jaxcomp.data.calibration import calibration_set
from jaxcomp.eval.perplexity import perplexity, wikitext2
from jaxcomp.models import io
from jaxcomp.models.io.tokenizer import gguf_tokenizer
from jaxcomp.models.llama_surgery import rotate_llama

PROJ = r"layers/(\d+/)?(attn|mlp)/\w+_proj"
E4M3 = dict(w_format="e4m3")
ROWS = {
    "int8 weights only": [(PROJ, jc.Quant(w_bits=8))],
    "E4M3 weights only": [(PROJ, jc.Quant(**E4M3))],
    "int8 W8A8": [(PROJ, jc.Quant(w_bits=8, a_bits=8))],
    "E4M3 W8A8": [(PROJ, jc.Quant(**E4M3, a_format="e4m3"))],
    "int8 weights, E4M3 activations": [(PROJ, jc.Quant(w_bits=8, a_format="e4m3"))],
    "E4M3 weights, int8 activations": [(PROJ, jc.Quant(**E4M3, a_bits=8))],
}
for family, pattern in (("q/k/v", r"attn/(q|k|v)_proj"), ("o", r"attn/o_proj"),
                        ("gate/up", r"mlp/(gate|up)_proj"), ("down", r"mlp/down_proj")):
  ROWS[f"E4M3 activations into {family} only (int8 weights)"] = [
      (rf"layers/(\d+/)?{pattern}", jc.Quant(w_bits=8, a_format="e4m3")),
      (PROJ, jc.Quant(w_bits=8))]
GPTQ = dict(method="gptq", options={"act_order": True})
ROWS["E4M3 weights only, GPTQ"] = [(PROJ, jc.Quant(**E4M3, **GPTQ))]
ROWS["E4M3 W8A8, GPTQ weights"] = [(PROJ, jc.Quant(**E4M3, a_format="e4m3", **GPTQ))]
for name in ("int8 W8A8", "E4M3 weights only", "int8 weights, E4M3 activations", "E4M3 W8A8",
             "E4M3 W8A8, GPTQ weights"):
  ROWS[f"rotated, {name}"] = ROWS[name]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_tokens", type=int, default=8192)
  parser.add_argument("--rows", default="", help="regex: only the rows it finds")
  parser.add_argument("--n_calib", type=int, default=32, help="GPTQ's 512-token windows")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  path = io.fetch_smollm2(args.cache_dir)
  model = io.load_gguf(path)
  tok = gguf_tokenizer(path)
  ids = np.asarray(tok.encode(wikitext2("test")).ids[:args.max_tokens], np.int32)
  rows = {name: rules for name, rules in ROWS.items() if re.search(args.rows, name)}
  calib = (calibration_set(tok, {"wikitext2_valid": 1}, n_seq=args.n_calib, seq_len=512)
           if any(rules[0][1].method == "gptq" for rules in rows.values()) else None)
  rotated = (rotate_llama(model, jax.random.key(0))
             if any(name.startswith("rotated") for name in rows) else None)
  score = lambda m: perplexity(m, ids, seq_len=512, batch_size=4)["ppl"]
  t0 = time.perf_counter()
  base = score(model)
  out = {"float": base}
  print(f"SmolLM2-135M-Instruct, WikiText-2 test, first {len(ids)} tokens, the 210 "
        f"projections (RTN unless GPTQ)\n\n| quantized | ppl | increase |\n|---|---:|---:|\n"
        f"| float | {base:.3f} | |", flush=True)
  for name, rules in rows.items():
    recipe = jc.Recipe([jc.Rule(pattern, quant=q) for pattern, q in rules])
    m = rotated if name.startswith("rotated") else model
    q = (jc.ptq(m, recipe, calib, progress=False) if rules[0][1].method == "gptq"
         else jc.quantize(m, recipe))
    out[name] = p = score(q)
    print(f"| {name} | {p:.3f} | {100 * (p / base - 1):+.2f}% |", flush=True)
  print(f"\n({time.perf_counter() - t0:.0f} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
