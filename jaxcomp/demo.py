"""A short QAT demo on an embedded synthetic task: the project's main job until real data lands.

A tiny Llama learns "Fibonacci mod V" sequences (each token is the sum of the two before it,
modulo V), a task that needs attention to the previous two positions. The float model is
trained first; each quantized variant then starts from its weights (`jc.quantize` leaves the
float model untouched), is evaluated right after quantization, fine-tuned with QAT, and
evaluated again; "float32 + fine-tune" gets the same extra steps in float, so it is the row to
compare QAT against. The report gives next-token accuracy, train-step time and weight bits.

    python -m jaxcomp.demo                     # about three minutes on 2 CPU cores
    python -m jaxcomp.demo --float_steps=200 --qat_steps=50
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

import jaxcomp as jc
from jaxcomp.eval.size import model_bits
from jaxcomp.models import Llama, LlamaConfig

_FLOAT_STEPS = flags.DEFINE_integer("float_steps", 400, "Float training steps.")
_QAT_STEPS = flags.DEFINE_integer("qat_steps", 150, "QAT steps per quantized variant.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

VOCAB, SEQ, BATCH = 32, 32, 64

# Rules shared by every variant: the embedding table and norms stay float (as usual for QAT).
_SKIP = jc.Rule(r"embed|.*norm", skip=True)
VARIANTS: dict[str, jc.Quant] = {
    "w8a8 (int8 fwd+bwd dots)": jc.Quant(w_bits=8, a_bits=8, g_bits=8),
    "w4a8 + LSQ": jc.Quant(w_bits=4, a_bits=8, learn_scale=True),
    "w4 weight-only + LSQ": jc.Quant(w_bits=4, learn_scale=True),
}


def fibonacci_batch(key: jax.Array, batch: int = BATCH) -> jax.Array:
  """int32[batch, SEQ]: two random seeds, then ``t[i] = (t[i-1] + t[i-2]) mod VOCAB``."""
  seeds = jax.random.randint(key, (batch, 2), 0, VOCAB)

  def step(carry, _):
    a, b = carry
    return (b, (a + b) % VOCAB), b

  _, rest = jax.lax.scan(step, (seeds[:, 0], seeds[:, 1]), None, length=SEQ)
  return jnp.concatenate([seeds[:, :1], rest.T[:, :-1]], axis=1)


def loss_and_accuracy(model: nnx.Module, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy and accuracy on the positions that are determined (t >= 2)."""
  logits = model(tokens[:, :-1])[:, 1:]
  targets = tokens[:, 2:]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == targets)


def train(model: nnx.Module, steps: int, lr: float, key: jax.Array) -> tuple[nnx.Module, float]:
  """Adam with cosine decay; returns the trained model and the median step time (s)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    grads = jax.grad(lambda p: loss_and_accuracy(nnx.merge(graphdef, p, rest), tokens)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  times = []
  for i in range(steps):
    tokens = fibonacci_batch(jax.random.fold_in(key, i))
    t0 = time.perf_counter()
    params, opt_state = jax.block_until_ready(step(params, opt_state, tokens))
    times.append(time.perf_counter() - t0)
  times = sorted(times[1:]) or [0.0]
  return nnx.merge(graphdef, params, rest), times[len(times) // 2]


def evaluate(model: nnx.Module) -> float:
  tokens = fibonacci_batch(jax.random.key(10_000), batch=512)
  return float(jax.jit(lambda t: loss_and_accuracy(model, t)[1])(tokens))


def main(argv: list[str]) -> None:
  del argv
  key = jax.random.key(_SEED.value)
  cfg = LlamaConfig.tiny(vocab_size=VOCAB, dim=64, n_layers=2, max_seq_len=SEQ)
  print(f"jaxcomp demo: tiny Llama ({cfg.dim}d, {cfg.n_layers} layers) on Fibonacci mod {VOCAB}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  base, t_float = train(Llama(cfg, rngs=nnx.Rngs(_SEED.value)), _FLOAT_STEPS.value, 3e-3, key)
  rows: list[tuple[str, float, float, float, int]] = []
  float_bits = model_bits(base)
  rows.append(("float32", float("nan"), evaluate(base), t_float, float_bits))
  # The fair reference for QAT: the float model trained for the same extra steps.
  tuned, t_tuned = train(base, _QAT_STEPS.value, 1e-3, jax.random.fold_in(key, 1))
  rows.append(("float32 + fine-tune", float("nan"), evaluate(tuned), t_tuned, float_bits))
  for name, spec in VARIANTS.items():
    recipe = jc.Recipe([_SKIP, jc.Rule(r".*", quant=spec)])
    qmodel = jc.quantize(base, recipe, strict=True)
    before = evaluate(qmodel)
    qmodel, t_step = train(qmodel, _QAT_STEPS.value, 1e-3, jax.random.fold_in(key, 1))
    rows.append((name, before, evaluate(qmodel), t_step, model_bits(qmodel, recipe)))
  print(f"\n{'variant':<26} {'acc after quantize':>18} {'acc after QAT':>14} "
        f"{'step ms':>8} {'weight KiB':>10}")
  for name, before, after, t, bits in rows:
    b = "-" if before != before else f"{before:.4f}"
    print(f"{name:<26} {b:>18} {after:>14.4f} {1e3 * t:8.2f} {bits / 8 / 1024:10.1f}")
  print("\nStep times of this tiny model are dominated by dispatch; see bench/qat_step.py for "
        "QAT speed at realistic sizes.")


if __name__ == "__main__":
  app.run(main)
