"""Pod dry runs: HBM per chip of the distillation training step on TPU slices that are not
here, from the real TPU compiler (`jaxcomp.train.loop.compile_step`; compiler estimates, not
measurements).

Two setups of ``configs/smollm2_distill.py``, with stacked (scanned) layers:

* ``smollm2``: SmolLM2-135M, float32 teacher, student 2:4 + w4 LSQ (variant ``w4_2of4``),
  4 sequences of 512 tokens per chip;
* ``llama3_8b``: Llama-3-8B's shapes, bfloat16 teacher, student w4g128 LSQ (no pruning),
  1 sequence of 2048 tokens per chip;

each for the ``data_parallel``, ``fsdp`` and ``fsdp_tensor`` rules on each topology (default:
``v5p:4x4x4``, 64 chips = Cloud's v5p-128, 95 GiB each; ``v6e:16x16``, 256 chips = v6e-256,
32 GiB each). A combination the model's shapes cannot take (9 heads over a tensor axis of 4)
is reported with the compiler's or the loop's one-line reason.

    python bench/pod_dry_run.py                           # the table in docs/training.md
    python bench/pod_dry_run.py --models smollm2 --topologies v5p:4x4x4 --rules fsdp
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no TPU to start


def _config(model: str, topology: str, rules: str, chips: int):
  sys.path.insert(0, str(ROOT / "configs"))
  from smollm2_distill import STUDENT, get_config  # pylint: disable=import-outside-toplevel
  import jaxcomp as jc  # pylint: disable=import-outside-toplevel
  config = get_config("w4_2of4")
  config.model.scan_layers = True
  if model == "llama3_8b":
    config.model.name = "llama3_8b"
    config.teacher.dtype = "bfloat16"
    config.student.prune = None
    config.train.sparsity = None
    config.recipe = jc.Recipe([jc.Rule(STUDENT, quant=jc.Quant(
        w_bits=4, group=128, learn_scale=True), name="proj")]).to_config()
    per_chip, seq = 1, 2048
  else:
    per_chip, seq = 4, 512
  config.data.seq_len = seq
  config.data.batch_size = per_chip * chips
  tensor = 4 if rules == "fsdp_tensor" else 1
  fsdp = 1 if rules == "data_parallel" else 16
  config.mesh.shape = dict(data=chips // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
  config.mesh.rules = rules
  del topology
  return config, per_chip, seq


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="smollm2,llama3_8b")
  parser.add_argument("--topologies", default="v5p:4x4x4,v6e:16x16")
  parser.add_argument("--rules", default="data_parallel,fsdp,fsdp_tensor")
  args = parser.parse_args()
  from jaxcomp import aot  # pylint: disable=import-outside-toplevel
  from jaxcomp.train.loop import compile_step  # pylint: disable=import-outside-toplevel
  print("| model | topology (chips) | rules | mesh (data, fsdp, tensor) | batch per chip | "
        "arguments GiB | temporaries GiB | peak GiB per chip | HBM GiB | fits | compile s |")
  print("|---|---|---|---|---|---:|---:|---:|---:|---|---:|")
  for model in args.models.split(","):
    for topology in args.topologies.split(","):
      chips = len(aot.target(topology).devices)
      for rules in args.rules.split(","):
        config, per_chip, seq = _config(model, topology, rules, chips)
        mesh = tuple(config.mesh.shape[a] for a in ("data", "fsdp", "tensor"))
        head = f"| {model} | {topology} ({chips}) | {rules} | {mesh} | {per_chip} x {seq} |"
        t0 = time.perf_counter()
        try:
          with tempfile.TemporaryDirectory() as work:
            r = compile_step(config, work, topology)
        except (ValueError, RuntimeError) as e:
          reason = str(e).splitlines()[0][:160]
          print(f"{head} - | - | - | - | cannot: {reason} | {time.perf_counter() - t0:.0f} |",
                flush=True)
          continue
        print(f"{head} {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['hbm_gib']:.1f} | {'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} |",
              flush=True)


if __name__ == "__main__":
  main()
