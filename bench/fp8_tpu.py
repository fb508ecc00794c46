"""What XLA:TPU makes of an fp8 dot on chips without an fp8 MXU rate (v5e, v6e): compiled
ahead of time with libtpu (`jaxcomp.aot`, no TPU needed), summed ``estimated_cycles`` of the
program's fusions (**compiler estimates, not measurements**) for one (8192, 2048) x (2048, 8192)
product from bfloat16 inputs: the bf16 dot, the bare fp8 and int8 dots (their input
conversions included), and jaxcomp's W8A8 fp8 layer (`jc.Quant(w_format="e4m3",
a_format="e4m3")`: scales, rounding and the fp8 dot). Prints the operand types XLA keeps.

    python bench/fp8_tpu.py
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

import jaxcomp as jc
from jaxcomp import aot
from jaxcomp.quant import dot as qdot

DIMS = (((1,), (0,)), ((), ()))
PROGRAMS = {
    "bf16 dot": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
    "fp8 e4m3 dot (+ conversions)": lambda x, w: jnp.dot(
        x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn),
        preferred_element_type=jnp.float32),
    "int8 dot (+ conversions)": lambda x, w: jnp.dot(
        x.astype(jnp.int8), w.astype(jnp.int8), preferred_element_type=jnp.int32),
    "jaxcomp W8A8 e4m3 layer": lambda x, w: qdot.quant_dot_general(
        x, w, DIMS, jc.Quant(w_format="e4m3", a_format="e4m3")),
}


def main() -> None:
  x = jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((2048, 8192), jnp.bfloat16)
  print("| chip | program | est. Mcycles | x bf16 | dot operands |")
  print("|---|---|---:|---:|---|")
  for chip in ("v5e", "v6e"):
    base = None
    for name, fn in PROGRAMS.items():
      compiled, report = aot.compile_for(fn, x, w, target=chip)
      hlo = compiled.as_text()
      m = re.search(r"= \S+ (?:convolution|dot)\((%[\w.]+), (%[\w.]+)\)", hlo)
      types = []
      for op in m.groups() if m else ():
        line = next(l for l in hlo.splitlines() if l.strip().startswith(op + " ="))
        types.append(line.split("=", 1)[1].split("[", 1)[0].strip())
      base = base or report.estimated_cycles
      print(f"| {chip} | {name} | {report.estimated_cycles / 1e6:.2f} | "
            f"{report.estimated_cycles / base:.2f} | {' x '.join(types)} |")


if __name__ == "__main__":
  main()
