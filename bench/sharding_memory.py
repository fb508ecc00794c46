"""Per-device bytes of params + optimizer state under data parallel, FSDP and FSDP + tensor.

Compiles (does not run) the training step of a SmolLM2-135M-shaped Llama (random weights, no
download) with AdamW on 8 simulated CPU devices and reads the compiled executable's memory
analysis: ``argument_size_in_bytes`` per device, minus the batch shard, is what each device
holds of the params and the optimizer state. The target of the distillation issue is FSDP's
per-device bytes <= 1.05 x (total / 8).

    python bench/sharding_memory.py
    python bench/sharding_memory.py --layers 4 --json runs/sharding_memory.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxcomp.models import Llama, LlamaConfig  # noqa: E402
from jaxcomp.train import sharding as sh  # noqa: E402
from jaxcomp.train.loop import TrainState, make_step  # noqa: E402

SETUPS = (("data_parallel", {"data": 8}), ("fsdp", {"fsdp": 8}),
          ("fsdp_tensor", {"fsdp": 4, "tensor": 2}))


def _lm_loss(model, batch, rng, frozen=None):
  del rng, frozen
  logits = model(batch["tokens"][:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["tokens"][:, 1:]).mean(), {}


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  assert jax.device_count() == 8, jax.devices()

  config = LlamaConfig.smollm2_135m(n_layers=args.layers)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  tx = optax.adamw(1e-4)
  state = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0))), params)
  total = _nbytes(state.params) + _nbytes(state.opt_state)
  batch = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)}
  print(f"SmolLM2-135M-shaped Llama, {args.layers} layers: params "
        f"{_nbytes(state.params) / 2**20:.1f} MiB + AdamW state "
        f"{_nbytes(state.opt_state) / 2**20:.1f} MiB = {total / 2**20:.1f} MiB; "
        f"8 CPU devices\n")
  print("| rules | mesh | per-device params + opt state MiB | x (total / 8) | "
        "temp MiB / device |")
  print("|---|---|---:|---:|---:|")
  rows = []
  for rules, shape in SETUPS:
    mesh = sh.make_mesh(ml_collections.ConfigDict({"shape": shape}))
    shardings = sh.state_shardings(state, mesh, rules)
    batch_sharding = sh.batch_sharding(mesh)
    step = jax.jit(make_step(_lm_loss, graphdef, rest, tx),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)
    with sh.activation_rules(mesh, rules):
      compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    batch_per_device = _nbytes(batch) // 8
    per_device = mem.argument_size_in_bytes - batch_per_device
    ratio = per_device / (total / 8)
    rows.append(dict(rules=rules, mesh=shape, per_device_bytes=int(per_device),
                     total_bytes=int(total), ratio_to_total_over_8=ratio,
                     temp_bytes=int(mem.temp_size_in_bytes)))
    print(f"| {rules} | {shape} | {per_device / 2**20:.1f} | {ratio:.3f} | "
          f"{mem.temp_size_in_bytes / 2**20:.1f} |", flush=True)
  fsdp = next(r for r in rows if r["rules"] == "fsdp")
  ok = fsdp["ratio_to_total_over_8"] <= 1.05
  print(f"\nFSDP per-device state <= 1.05 x total/8: {'PASS' if ok else 'FAIL'} "
        f"({fsdp['ratio_to_total_over_8']:.3f})")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
