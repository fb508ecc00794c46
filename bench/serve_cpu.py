"""Serving speed of SmolLM2-135M on CPU: float32 vs packed int8 vs packed int4, one run.

Each model runs a jitted prefill of ``--prompt`` tokens (batch 1) and ``--new`` greedy
single-token decode steps against a KV cache (`jaxcomp.models.make_decode_fns`). Rounds are
interleaved across the three models and the median is reported, as tokens/s and as a ratio
to float32.

* packed int8: `jc.convert` of W8A8 (per-channel int8 weights, per-token int8 activations) on
  the 210 projections and the tied embedding / output head: every matmul but attention's is
  an ``int8 x int8 -> int32`` dot on the stored values.
* packed int4: projections 4-bit, groups of 128, weight-only (dequantized for a float dot: the
  int4 kernels are #6's); the embedding / head int8 W8A8 as above.
* packed w4a8 / w4a8 g128: projections 4-bit per output channel / in groups of 128 with
  per-token int8 activations (`jc.Quant(w_bits=4, a_bits=8)`): at prefill the stored nibbles
  unpacked to int8 for the int8 GEMM; at decode two int8 GEMMs on the packed bytes as stored
  (``b & 15`` against the even and odd activation columns, ``b`` against the odd ones; a
  byte is ``16 hi + lo + 8``; per group a block-diagonal activation operand); the head int8
  W8A8.
  Their accuracy cost: README.

    python bench/serve_cpu.py                      # prompt 512, 32 decode steps, 5 rounds
    python bench/serve_cpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcomp as jc
from jaxcomp.models import io, make_decode_fns

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"


def _models(model):
  w8a8 = jc.Quant(w_bits=8, a_bits=8)
  int8 = jc.convert(jc.quantize(model, jc.Recipe([
      jc.Rule("embed", quant=w8a8), jc.Rule(PROJ, quant=w8a8)])))
  int4 = jc.convert(jc.quantize(model, jc.Recipe([
      jc.Rule("embed", quant=w8a8), jc.Rule(PROJ, quant=jc.Quant(w_bits=4, group=128))])))
  w4a8 = {name: jc.convert(jc.quantize(model, jc.Recipe([
      jc.Rule("embed", quant=w8a8), jc.Rule(PROJ, quant=jc.Quant(w_bits=4, a_bits=8, group=g))])))
      for name, g in (("packed w4a8", None), ("packed w4a8 g128", 128))}
  return {"float32": model, "packed int8": int8, "packed int4": int4, **w4a8}


def _time_one(fns, init_cache, prompt, n_new):
  prefill_fn, decode_fn = fns
  cache = init_cache()
  t0 = time.perf_counter()
  logits, cache = prefill_fn(prompt, cache)
  jax.block_until_ready(logits)
  t_prefill = time.perf_counter() - t0
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  t0 = time.perf_counter()
  for _ in range(n_new):
    logits, cache = decode_fn(tok, cache)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
  jax.block_until_ready(tok)
  t_decode = time.perf_counter() - t0
  return prompt.shape[1] / t_prefill, n_new / t_decode


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--models", default="",
                      help="comma-separated subset of the rows (float32 always runs)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  path = io.fetch_smollm2(args.cache_dir)
  model = io.load_gguf(path)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                          (1, args.prompt)), jnp.int32)
  max_len = args.prompt + args.new + 1
  models = _models(model)
  if args.models:
    keep = {"float32", *[m.strip() for m in args.models.split(",")]}
    unknown = keep - set(models)
    if unknown:
      raise SystemExit(f"--models: unknown {sorted(unknown)} (rows: {', '.join(models)})")
    models = {k: v for k, v in models.items() if k in keep}
  fns = {name: make_decode_fns(m) for name, m in models.items()}
  init = {name: (lambda m=m: m.init_cache(1, max_len)) for name, m in models.items()}
  for name in models:  # compile
    _time_one(fns[name], init[name], prompt, 2)
  samples = {name: ([], []) for name in models}
  for _ in range(args.rounds):
    for name in models:
      p, d = _time_one(fns[name], init[name], prompt, args.new)
      samples[name][0].append(p)
      samples[name][1].append(d)
  out = {"prompt": args.prompt, "new_tokens": args.new, "rounds": args.rounds, "models": {}}
  base = {k: statistics.median(v) for k, v in zip(("prefill", "decode"), samples["float32"])}
  print(f"SmolLM2-135M, batch 1, prompt {args.prompt}, {args.new} decode steps, median of "
        f"{args.rounds} interleaved rounds ({jax.devices()[0].device_kind})")
  print(f"{'model':<18}{'prefill tok/s':>15}{'x f32':>8}{'decode tok/s':>15}{'x f32':>8}")
  for name, (pre, dec) in samples.items():
    p, d = statistics.median(pre), statistics.median(dec)
    out["models"][name] = {"prefill_tok_s": p, "decode_tok_s": d,
                           "prefill_x_f32": p / base["prefill"], "decode_x_f32": d / base["decode"]}
    print(f"{name:<18}{p:>15.1f}{p / base['prefill']:>8.2f}{d:>15.1f}{d / base['decode']:>8.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
