"""Packed SmolLM2-135M end to end through the Pallas kernels (interpreted on CPU) vs XLA.

Two packed models of the PTQ issue, on the 210 projections (head and attention float):

* ``smoothquant_w8a8``: `jc.ptq` SmoothQuant (alpha 0.5; 16 x 256 calibration tokens of
  WikiText-2 *valid*), per-channel int8 weights, per-token int8 activations -> every
  projection is an `int8_matmul`;
* ``rtn_w4g64``: int4 weights in groups of 64 (576 = 9 x 64), weight-only -> `int4_matmul`.

For each model, the logits of a short real prompt with the dot dispatch forced to ``xla``
(the reference, jitted), ``tpu`` (Mosaic kernels under ``pltpu.InterpretParams``) and
``gpu`` (Triton kernels, ``interpret=True``), each freshly traced. Reported per path:

* ``per-call``: every kernel call inside the model also runs its XLA reference on the *same*
  inputs; the largest difference relative to that call's output (int8: 0, the int32
  accumulator and the f32 epilogue are exact);
* end to end: largest logit difference / largest logit, greedy-token agreement;
* for W8A8, the same numbers for the XLA path run eagerly (op by op) against the jitted XLA
  path: a different program of the same math. Per-token int8 activation rounding turns the
  last-ulp differences of any two programs into whole quantization steps, so this is the
  scale an end-to-end W8A8 comparison can be held to; weight-only int4 has no such step and
  is held to bf16 precision (2^-8).

    python bench/kernels_smollm2.py
    python bench/kernels_smollm2.py --json runs/kernels/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxcomp as jc
from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.models import io
from jaxcomp.oneshot.calibrate import calib_tokens
from jaxcomp.quant import dot as dot_lib

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
BF16_TOL = 2.0 ** -8
_CALL_DIFFS: list[float] = []


def _checked(kernel):
  """``kernel`` that also runs its XLA path on the same inputs and records the difference."""

  def run(*args, **kwargs):
    y = kernel(*args, **kwargs)
    ref = kernel(*args, **{**kwargs, "backend": "xla"})
    diff = jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))) / jnp.maximum(
        jnp.max(jnp.abs(ref.astype(jnp.float32))), 1e-30)
    jax.debug.callback(lambda d: _CALL_DIFFS.append(float(d)), diff)
    return y

  return run


def _logits(model, tokens, backend: str, *, eager: bool = False) -> np.ndarray:
  os.environ["JAXCOMP_KERNEL_BACKEND"] = backend
  if eager:
    return np.asarray(model(tokens), np.float32)
  graphdef, state = nnx.split(model)
  fn = lambda s, t: nnx.merge(graphdef, s)(t)  # a new function: no jit cache across backends
  return np.asarray(jax.jit(fn)(state, tokens), np.float32)


def _compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
  rel = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  return rel, float(np.mean(out.argmax(-1) == ref.argmax(-1)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", default="It is a truth universally acknowledged, that a "
                      "single man in possession of a good fortune, must be in want of a wife.")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  path = io.fetch_smollm2(args.cache_dir)
  model, tokenizer = io.load_gguf(path), io.gguf_tokenizer(path)
  tokens = jnp.asarray([tokenizer.encode(args.prompt).ids], jnp.int32)
  calib = calib_tokens(tokenizer, n_seq=16, seq_len=256,
                       text_path=str(ppl_lib.WIKITEXT2_DIR / "valid.txt"))
  models = {
      "smoothquant_w8a8": jc.convert(jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(
          w_bits=8, a_bits=8, method="smoothquant", options={"alpha": 0.5}))]), calib)),
      "rtn_w4g64": jc.convert(jc.quantize(model, jc.Recipe([
          jc.Rule(PROJ, quant=jc.Quant(w_bits=4, group=64))]))),
  }
  dot_lib.pallas_kernels.int8_matmul = _checked(dot_lib.pallas_kernels.int8_matmul)
  dot_lib.pallas_kernels.int4_matmul = _checked(dot_lib.pallas_kernels.int4_matmul)

  print(f"\nprompt: {tokens.shape[1]} tokens; {jax.default_backend()} host: the kernels run "
        "interpreted\n")
  print("| model | path | kernel calls | per-call max diff | logits max diff / max | "
        "greedy tokens agree | s |")
  print("|---|---|---:|---:|---:|---:|---:|")
  rows = []
  for name, packed in models.items():
    ref = _logits(packed, tokens, "xla")
    paths = [("tpu", "tpu (interpret)"), ("gpu", "gpu (interpret)")]
    if name.endswith("w8a8"):
      paths.insert(0, ("xla-eager", "xla, eager vs jit"))
    for backend, label in paths:
      _CALL_DIFFS.clear()
      t0 = time.perf_counter()
      out = _logits(packed, tokens, "xla" if backend == "xla-eager" else backend,
                    eager=backend == "xla-eager")
      seconds = time.perf_counter() - t0
      rel, agree = _compare(out, ref)
      calls = len(_CALL_DIFFS)
      per_call = max(_CALL_DIFFS) if calls else None
      rows.append(dict(model=name, path=backend, kernel_calls=calls, per_call_max_diff=per_call,
                       rel_diff=rel, greedy_agree=agree, tokens=int(tokens.shape[1]),
                       seconds=round(seconds, 1)))
      print(f"| {name} | {label} | {calls} | "
            f"{'' if per_call is None else f'{per_call:.1e}'} | {rel:.2e} | {agree:.3f} | "
            f"{seconds:.1f} |", flush=True)
  by = {(r["model"], r["path"]): r for r in rows}
  checks = {
      "every projection ran a kernel (210 calls)": all(
          r["kernel_calls"] == 210 for r in rows if r["path"] != "xla-eager"),
      "int8 kernel calls exact": all(by[("smoothquant_w8a8", b)]["per_call_max_diff"] == 0
                                     for b in ("tpu", "gpu")),
      "int4 kernel calls within bf16": all(by[("rtn_w4g64", b)]["per_call_max_diff"] <= BF16_TOL
                                           for b in ("tpu", "gpu")),
      "w4 logits within bf16": all(by[("rtn_w4g64", b)]["rel_diff"] <= BF16_TOL
                                   for b in ("tpu", "gpu")),
      "w8a8 logits within XLA's own eager-vs-jit difference, greedy tokens equal": all(
          by[("smoothquant_w8a8", b)]["rel_diff"]
          <= by[("smoothquant_w8a8", "xla-eager")]["rel_diff"]
          and by[("smoothquant_w8a8", b)]["greedy_agree"] == 1.0 for b in ("tpu", "gpu")),
  }
  print()
  for what, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "checks": checks}, f, indent=2)
  if not all(checks.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
