"""Wall time of GPTQ over every matched matrix of SmolLM2-135M on this machine.

Calibration: ``--n_seq`` sequences of ``--seq_len`` tokens cut from a training text (by
default the Jane Austen novels of Debian's ``r-cran-janeaustenr``; ``--calib_text`` for any
file; never the WikiText-2 test split). Runs `jaxcomp.ptq` with GPTQ on all 210 projection
matrices of the 30 blocks, sequentially (each block sees the outputs of the quantized blocks
before it), and prints the time split into loading, calibration capture + solves, and total.

    python bench/ptq_time.py                               # 128 x 512 tokens, w4 per channel
    python bench/ptq_time.py --group 128 --act_order --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jaxcomp as jc
from jaxcomp.models import io
from jaxcomp.oneshot import calib_tokens


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_seq", type=int, default=128)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--group", type=int, default=None)
  parser.add_argument("--act_order", action="store_true")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--calib_text", default=None,
                      help="calibration text file (default: the Jane Austen novels)")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  t_start = time.perf_counter()
  path = io.fetch_smollm2(args.cache_dir)
  model = io.load_gguf(path, attn_batch_chunk=1)  # CPU: scores stay in cache
  tokenizer = io.gguf_tokenizer(path)
  calib = calib_tokens(tokenizer, n_seq=args.n_seq, seq_len=args.seq_len,
                       text_path=args.calib_text)
  t_loaded = time.perf_counter()

  spec = jc.Quant(w_bits=args.bits, group=args.group, method="gptq",
                  options={"act_order": args.act_order})
  recipe = jc.Recipe([jc.Rule(r"layers/\d+/(attn|mlp)/\w+_proj", quant=spec)])
  _, results = jc.ptq(model, recipe, calib, batch_size=args.batch_size, return_report=True)
  t_done = time.perf_counter()

  solve_s = sum(r.seconds for r in results)
  out = {
      "spec": spec.to_dict(), "calib_tokens": int(calib.size), "matrices": len(results),
      "load_s": round(t_loaded - t_start, 1), "ptq_s": round(t_done - t_loaded, 1),
      "solve_s": round(solve_s, 1), "total_s": round(t_done - t_start, 1),
      "mean_rel_error": float(np.mean([r.error for r in results])),
  }
  print(f"GPTQ w{args.bits}{'g' + str(args.group) if args.group else ''}"
        f"{' act-order' if args.act_order else ''}: {len(results)} matrices, "
        f"{calib.shape[0]}x{calib.shape[1]} calibration tokens")
  print(f"  load + tokenize {out['load_s']}s | ptq {out['ptq_s']}s (of which solves "
        f"{out['solve_s']}s) | total {out['total_s']}s | mean relative layer error "
        f"{out['mean_rel_error']:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
