"""Peak host memory of the sequential calibration walk: a stacked (``scan_layers``) Llama vs the
same model unrolled, without the PTQ job around it.

A random Llama of SmolLM2-135M's width (d 576, ffn 1536, 9 / 3 heads, vocab 49152, tied) with
``--layers`` blocks is built in each form and ``jc.ptq`` (GPTQ w4g128, act-order) runs on random
calibration tokens; each form runs in its own process, which reports its own maximum resident
set size (``ru_maxrss``) after building the model and after PTQ.

    python bench/scan_walk_memory.py --layers 16
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def _child(form: str, layers: int, n_seq: int, seq_len: int) -> None:
  import resource  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import jaxcomp as jc  # pylint: disable=import-outside-toplevel
  from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel

  peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  cfg = LlamaConfig(vocab_size=49152, dim=576, n_layers=layers, n_heads=9, n_kv_heads=3,
                    ffn_dim=1536, max_seq_len=seq_len, tie_embeddings=True,
                    scan_layers=form == "scan_layers")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  calib = jax.random.randint(jax.random.key(1), (n_seq, seq_len), 0, cfg.vocab_size)
  built = peak()
  recipe = jc.Recipe([jc.Rule(r".*_proj", quant=jc.Quant(w_bits=4, group=128, method="gptq",
                                                         options={"act_order": True}))])
  jc.ptq(model, recipe, calib, progress=False)
  print(f"RESULT {built:.0f} {peak():.0f}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--n_seq", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.layers, args.n_seq, args.seq_len)
    return
  rows = []
  for form in ("unrolled", "scan_layers"):
    cmd = [sys.executable, __file__, f"--child={form}", f"--layers={args.layers}",
           f"--n_seq={args.n_seq}", f"--seq_len={args.seq_len}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    out = proc.stdout
    if proc.returncode != 0:
      raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    built, after = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    rows.append((form, built, after))
  print(f"\nrandom Llama, SmolLM2 width, {args.layers} layers; GPTQ w4g128 on "
        f"{args.n_seq} x {args.seq_len} tokens\n")
  print("| form | peak RSS MB after build | peak RSS MB after PTQ |")
  print("|---|---:|---:|")
  for form, built, after in rows:
    print(f"| {form} | {built} | {after} |")
  print(f"\npeak after PTQ, scanned / unrolled: {int(rows[1][2]) / int(rows[0][2]):.3f} "
        "(target <= 1)")


if __name__ == "__main__":
  main()
