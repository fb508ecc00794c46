"""Train-step time of quantization-aware training: float vs jaxcomp vs Qwix, side by side.

Two models (an NNX Llama decoder, d=512, 4 layers, seq 256, batch 8; and a 4-block residual
MLP, 512 -> 2048 -> 512, batch 2048) are trained with Adam under `jax.jit`. For each model the
contenders are: float; jaxcomp w8a8 (int8 weights per channel, int8 activations per token,
int8 dots in the forward and both backward dots); jaxcomp w4 weight-only (per channel); and
Qwix's `QtProvider` w8a8 and w4 on the same model. Steps are interleaved round-robin, so slow
drift of the machine hits every contender alike; we report the median and min over rounds and
the ratios the acceptance targets name.

    python bench/qat_step.py                 # both models, 15 rounds
    python bench/qat_step.py --rounds 5 --models mlp --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxcomp as jc
from jaxcomp.models import Llama, LlamaConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)

# The w8a8 config benchmarked: all three dots in int8 (g_bits=8), per-token activations.
OURS_W8A8 = jc.Quant(w_bits=8, a_bits=8, g_bits=8)
OURS_W4 = jc.Quant(w_bits=4)


class MLPNet(nnx.Module):
  """Four residual blocks ``x + W2 relu(W1 x)`` (512 -> 2048 -> 512) and a 512x512 head."""

  def __init__(self, d: int = 512, hidden: int = 2048, n_blocks: int = 4, *, rngs: nnx.Rngs):
    self.up = nnx.List([nnx.Linear(d, hidden, rngs=rngs) for _ in range(n_blocks)])
    self.down = nnx.List([nnx.Linear(hidden, d, rngs=rngs) for _ in range(n_blocks)])
    self.head = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    for up, down in zip(self.up, self.down):
      x = x + down(jax.nn.relu(up(x)))
    return self.head(x)


def _decoder_task():
  cfg = LlamaConfig(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=2048,
                    max_seq_len=256)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 257), 0, cfg.vocab_size)
  batch = (tokens[:, :-1], tokens[:, 1:])

  def loss(m, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  # Layers of the decoder that both libraries quantize: every projection and the head.
  return model, batch, loss, r".*(proj|lm_head)"


def _mlp_task():
  model = MLPNet(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2048, 512))
  y = jax.random.normal(jax.random.key(2), (2048, 512))

  def loss(m, batch):
    return jnp.mean(jnp.square(m(batch[0]) - batch[1]))

  return model, (x, y), loss, r".*"


TASKS = {"decoder": _decoder_task, "mlp": _mlp_task}


def _ours(model, spec, pattern):
  return jc.quantize(model, jc.Recipe([jc.Rule(pattern, quant=spec)]), strict=True)


def _qwix(model, batch, pattern, weight_qtype, act_qtype):
  import qwix  # The bench extra; imported here so that --contenders without qwix need none.

  rule = qwix.QtRule(module_path=pattern, weight_qtype=weight_qtype, act_qtype=act_qtype,
                     op_names=("dot_general",))
  return qwix.quantize_model(model, qwix.QtProvider([rule]), batch[0][:2])


def make_step(model, loss_fn) -> tuple[Callable, tuple]:
  """A jitted Adam step over the model's params; returns (step, initial carry)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-4)

  @jax.jit
  def step(params, opt_state, batch):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)
    loss, grads = jax.value_and_grad(f)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, (params, tx.init(params))


def run(task: str, rounds: int, contenders: list[str]) -> dict[str, dict[str, float]]:
  model, batch, loss_fn, pattern = TASKS[task]()
  builders = {
      "float": lambda: model,
      "jaxcomp_w8a8": lambda: _ours(model, OURS_W8A8, pattern),
      "jaxcomp_w4": lambda: _ours(model, OURS_W4, pattern),
      "qwix_w8a8": lambda: _qwix(model, batch, pattern, jnp.int8, jnp.int8),
      "qwix_w4": lambda: _qwix(model, batch, pattern, jnp.int4, None),
  }
  steps, carries, losses = {}, {}, {}
  for name in contenders:
    steps[name], carries[name] = make_step(builders[name](), loss_fn)
    p, o, l = steps[name](*carries[name], batch)  # compile + warm up
    jax.block_until_ready(l)
    carries[name] = (p, o)
    losses[name] = float(l)
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name in contenders:
      t0 = time.perf_counter()
      p, o, l = steps[name](*carries[name], batch)
      jax.block_until_ready((p, l))
      times[name].append(time.perf_counter() - t0)
      carries[name] = (p, o)
  return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                 "first_loss": losses[name]} for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
  parser.add_argument("--contenders", nargs="+",
                      default=["float", "jaxcomp_w8a8", "jaxcomp_w4", "qwix_w8a8", "qwix_w4"])
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {args.rounds} interleaved rounds")
  results = {}
  for task in args.models:
    res = run(task, args.rounds, args.contenders)
    results[task] = res
    print(f"\n{task}: train step (Adam, jit)")
    print(f"{'contender':<14} {'median ms':>10} {'min ms':>8} {'x float':>8} {'x qwix':>8}")
    base = res.get("float", {}).get("median_ms")
    for name, r in res.items():
      rel = r["median_ms"] / base if base else float("nan")
      q = res.get("qwix_" + name.split("_")[-1], {}).get("median_ms") if name.startswith(
          "jaxcomp") else None
      vs_q = f"{r['median_ms'] / q:8.2f}" if q else f"{'':>8}"
      print(f"{name:<14} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {rel:8.2f} {vs_q}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
