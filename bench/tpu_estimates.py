"""TPU cost-model estimates: bf16 vs int8 training steps and packed forwards, compiled for v5e / v6e.

**Compiler estimates, not measurements** (no TPU is attached): each program is compiled ahead
of time by the real XLA:TPU compiler (`jaxcomp.aot`), and its cost is the sum of the
``estimated_cycles`` XLA's cost model writes into every fusion's backend config (XLA's
``optimal_seconds`` comes out negative for int8 programs, so it is not used). The quantized
layers run jaxcomp's XLA path (``backend="xla"``): Pallas custom calls carry no cycle estimate,
so the kernel path is not summed here (its roofline model is in docs/kernels.md).

Programs (bf16 parameters and activations throughout):

* ``mlp step``: Adam step of 4 residual blocks ``x + W2 relu(W1 x)`` (2048 -> 8192 -> 2048) on
  8192 tokens, MSE loss: bf16; w8a8 with int8 forward dots (backward dots in float); w8a8 with
  all three dots in int8 (``g_bits=8``: forward, input gradient, weight gradient), with dynamic
  scales and with delayed per-tensor scales (``scaling="delayed"``: the absmax histories
  differentiated too and overwritten by `jaxcomp.amax_overwrite`).
* ``mlp forward``: the same blocks, bf16 vs packed W8A8 (`jaxcomp.convert`: int8 weights per
  channel, int8 activations per token).
* ``llama forward``: SmolLM2-135M's shapes (30 blocks, d 576, ffn 1536, vocab 49152), 8 x 512
  tokens, bf16 vs packed W8A8 projections (attention and the tied head stay bf16).

Printed: one row per program, target and variant (summed cycles, fusions, cycles relative to
bf16, peak HBM), and for the int8 step the split between fusions that hold a dot and the
memory-bound rest (quantization passes, relayout copies).

The int8 step and the packed forwards also run on the **kernel path** (``backend="tpu"``:
jaxcomp's Pallas int8 kernel; in the packed forwards the activations are quantized inside it). Pallas calls carry no cycle estimate, so those rows
add to the XLA fusions' cycles each kernel call's **roofline model** (`pallas_kernels.tiling`:
its tiles, HBM traffic with re-reads, int8 peak, per-step overhead) at the chip's clock
(JAX's chip table: bf16 peak / (2 x MXUs x MXU width**2); 1.50 GHz v5e): a model, labelled so.

    python bench/tpu_estimates.py                       # v5e and v6e, ~10 minutes
    python bench/tpu_estimates.py --targets v5e --json /tmp/estimates.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxcomp as jc
from jaxcomp import aot
from jaxcomp.models.llama import Llama, LlamaConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)

D, HIDDEN, BLOCKS, TOKENS = 2048, 8192, 4, 8192
W8A8 = jc.Quant(w_bits=8, a_bits=8)
W8A8_G8 = jc.Quant(w_bits=8, a_bits=8, g_bits=8)
# Delayed scaling: per-tensor activation / gradient scales from the last 16 steps' absmax.
W8A8_G8_DELAYED = jc.Quant(w_bits=8, a_bits=8, g_bits=8, a_granularity="tensor",
                           scaling="delayed")


class MLP(nnx.Module):
  """Residual blocks ``x + W2 relu(W1 x)``, bf16 parameters, no biases."""

  def __init__(self, rngs: nnx.Rngs):
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=jnp.bfloat16,
                                    param_dtype=jnp.bfloat16, rngs=rngs)
    self.up = nnx.List([dense(D, HIDDEN) for _ in range(BLOCKS)])
    self.down = nnx.List([dense(HIDDEN, D) for _ in range(BLOCKS)])

  def __call__(self, x):
    for up, down in zip(self.up, self.down):
      x = x + down(jax.nn.relu(up(x)))
    return x


def _quantized(make, quant: jc.Quant | None, packed: bool = False, layers: str = r".*",
               backend: str = "xla"):
  """``make()`` as shapes only: float, QAT-rewritten with ``quant`` (the ``layers`` rule), or
  converted (packed), its quantized dots on ``backend``."""
  def build():
    model = make()
    if quant is None:
      return model
    model = jc.quantize(model, jc.Recipe([jc.Rule(layers, quant=quant)]), backend=backend)
    return jc.convert(model, backend=backend) if packed else model
  return nnx.eval_shape(build)


def mlp_step(quant: jc.Quant | None, backend: str = "xla"):
  model = _quantized(lambda: MLP(nnx.Rngs(0)), quant, backend=backend)
  delayed = quant is not None and quant.scaling == "delayed"
  # Delayed scaling: the absmax histories are differentiated too, and overwritten.
  wrt = (nnx.Param, jc.AmaxHistory) if delayed else nnx.Param
  tx = jc.amax_overwrite(optax.adam(1e-3)) if delayed else optax.adam(1e-3)
  opt = nnx.eval_shape(lambda: nnx.Optimizer(model, tx, wrt=wrt))
  graphdef, state = nnx.split((model, opt))

  def step(state, x, y):
    model, opt = nnx.merge(graphdef, state)
    loss = lambda m: jnp.mean(jnp.square(m(x).astype(jnp.float32) - y.astype(jnp.float32)))
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), value

  x = jax.ShapeDtypeStruct((TOKENS, D), jnp.bfloat16)
  return step, (state, x, x), (0,)


def _forward(model, inputs):
  graphdef, state = nnx.split(model)
  return (lambda s, t: nnx.merge(graphdef, s)(t)), (state, inputs), ()


def mlp_forward(quant: jc.Quant | None, backend: str = "xla"):
  model = _quantized(lambda: MLP(nnx.Rngs(0)), quant, packed=True, backend=backend)
  return _forward(model, jax.ShapeDtypeStruct((TOKENS, D), jnp.bfloat16))


def llama_forward(quant: jc.Quant | None, backend: str = "xla"):
  cfg = LlamaConfig.smollm2_135m(max_seq_len=512, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = _quantized(lambda: Llama(cfg, rngs=nnx.Rngs(0)), quant, packed=True,
                     layers=r".*_proj", backend=backend)
  return _forward(model, jax.ShapeDtypeStruct((8, 512), jnp.int32))


# (label, quantization, backend of the quantized dots): "tpu" rows are the kernel path.
PROGRAMS = {
    "mlp step": (mlp_step, [("bf16", None, "xla"), ("w8a8 (int8 forward)", W8A8, "xla"),
                            ("w8a8 g8 (3 int8 dots)", W8A8_G8, "xla"),
                            ("w8a8 g8, delayed per-tensor scales", W8A8_G8_DELAYED, "xla"),
                            ("w8a8 g8, kernel path (roofline)", W8A8_G8, "tpu")]),
    "mlp forward": (mlp_forward, [("bf16", None, "xla"), ("packed W8A8", W8A8, "xla"),
                                  ("packed W8A8, kernel path (roofline)", W8A8, "tpu")]),
    "llama forward": (llama_forward, [("bf16", None, "xla"), ("packed W8A8", W8A8, "xla"),
                                      ("packed W8A8, kernel path (roofline)", W8A8, "tpu")]),
}

_INT8_CALL = re.compile(
    r"= (\w+)\[(\d+),(\d+)\]\S* custom-call\(.*custom_call_target=\"tpu_custom_call\", "
    r"operand_layout_constraints=\{(\w+)\[(\d+),(\d+)\]")


def clock_hz(generation: str) -> float:
  """A TPU generation's clock from JAX's chip table: bf16 peak / (2 x MXUs x width**2)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  version = getattr(pltpu.ChipVersion, f"TPU_{generation.upper()}")
  info = pltpu.get_tpu_info_for_chip(version, 1)
  return info.bf16_ops_per_second / (2 * info.num_mxus * info.mxu_column_size ** 2)


def kernel_cycles(hlo: str, generation: str) -> tuple[int, int]:
  """``(calls, modelled cycles)`` of the int8 Pallas kernel calls in a compiled TPU program:
  each call's `pallas_kernels.tiling.roofline` (the tiles `tpu_blocks` picks for its shape
  and operand widths) at `clock_hz`."""
  from pallas_kernels import tiling  # pylint: disable=import-outside-toplevel
  int8_mod = importlib.import_module("pallas_kernels.int8_matmul")  # the package exports the function
  calls, seconds = 0, 0.0
  for line in hlo.splitlines():
    if "jaxcomp_int8_matmul" not in line:
      continue
    found = _INT8_CALL.search(line)
    if found is None:
      continue
    out_type, m, n, x_type, _, k = found.groups()
    m, n, k = int(m), int(n), int(k)
    x_dtype = {"s8": jnp.int8, "bf16": jnp.bfloat16, "f32": jnp.float32}[x_type]
    out_bytes = {"s32": 4, "f32": 4, "bf16": 2}[out_type]
    shape_bytes = int8_mod.tpu_tile_bytes(generation, x_dtype)
    blocks = tiling.tpu_blocks(generation, m=m, n=n, k=k, out_bytes=out_bytes, **shape_bytes)
    seconds += tiling.roofline(generation, blocks, m=m, n=n, k=k, out_bytes=out_bytes,
                               **shape_bytes).time_s
    calls += 1
  return calls, round(seconds * clock_hz(generation))

_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')
_CALLS = re.compile(r"calls=(%[\w.\-]+)")


def split_cycles(hlo: str) -> tuple[int, int]:
  """``(cycles of fusions holding a dot or convolution, cycles of the rest)`` of a compiled
  TPU program's text (`jax.stages.Compiled.as_text`)."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)

  def has_dot(name, depth=0):
    body = "\n".join(bodies.get(name, ()))
    if "convolution(" in body or " dot(" in body:
      return True
    return depth < 4 and any(has_dot(c, depth + 1) for c in _CALLS.findall(body))

  dots = rest = 0
  for line in hlo.splitlines():
    cycles = _CYCLES.search(line)
    if cycles:
      calls = _CALLS.search(line)
      if calls and has_dot(calls.group(1)):
        dots += int(cycles.group(1))
      else:
        rest += int(cycles.group(1))
  return dots, rest


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="v5e,v6e")
  parser.add_argument("--programs", default=",".join(PROGRAMS))
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  problem = aot.missing("tpu")
  if problem:
    raise SystemExit(f"tpu_estimates: {problem}")
  rows = []
  for target in args.targets.split(","):
    for program in args.programs.split(","):
      build, variants = PROGRAMS[program]
      base = None
      for variant, quant, backend in variants:
        t0 = time.perf_counter()
        on_kernels = backend == "tpu"
        fn, avals, donate = build(quant, backend)
        compiled, report = aot.compile_for(fn, *avals, target=target, donate_argnums=donate)
        hlo = compiled.as_text()
        dots, rest = split_cycles(hlo)
        calls, modelled = kernel_cycles(hlo, target) if on_kernels else (0, 0)
        if calls != report.custom_calls:
          raise SystemExit(f"{program} {variant}: counted {calls} of the "
                           f"{report.custom_calls} kernel calls")
        cycles = report.estimated_cycles + modelled
        base = base or cycles
        row = dict(program=program, target=target, variant=variant, cycles=cycles,
                   fusions=report.fusions, kernel_calls=calls, kernel_cycles=modelled,
                   ratio=cycles / base, dot_cycles=dots + modelled, other_cycles=rest,
                   peak_gib=report.peak_bytes / 2**30, compile_s=time.perf_counter() - t0)
        rows.append(row)
        print(f"{target} {program} {variant}: {row['cycles']:,} cycles ({row['ratio']:.3f}x), "
              f"{row['compile_s']:.0f} s", flush=True)
  print("\nCompiler estimates (XLA:TPU cost model, summed estimated_cycles of the fusions; "
        "not measurements)\n")
  print("| program | target | variant | est. cycles (M) | vs bf16 | in dots (M) | "
        "other fusions (M) | fusions | kernel calls | peak HBM GiB |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['program']} | {r['target']} | {r['variant']} | {r['cycles'] / 1e6:.1f} | "
          f"{r['ratio']:.3f} | {r['dot_cycles'] / 1e6:.1f} | {r['other_cycles'] / 1e6:.1f} | "
          f"{r['fusions']} | {r['kernel_calls']} | {r['peak_gib']:.2f} |")
  print("\n'in dots': fusions holding a dot, plus on the kernel path the kernels' roofline "
        "cycles (a model, not the compiler's)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
