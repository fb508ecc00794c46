"""Compiles every kernel case for the A100 and H100 targets and prints one JSON line each (run
by `test_aot.py` in a process of its own, with the CUDA plugin of ``make aot-gpu`` on
PYTHONPATH and ``JAX_PLATFORMS=cpu``); last, the error of a tile too large for H100's shared
memory.

    JAX_PLATFORMS=cpu PYTHONPATH=.venv/aot-gpu python -m tests.kernels.gpu_compile
"""

import json

import jax
import jax.numpy as jnp

from jaxcomp import aot
from pallas_kernels import int8_matmul, tiling
from tests.kernels.kernel_cases import KERNELS


def main() -> None:
  why = aot.missing("cuda")
  if why:
    raise SystemExit(f"cannot compile for GPUs here: {why}")
  for gpu in ("a100", "h100"):
    for name, (make, avals) in sorted(KERNELS.items()):
      _, report = aot.compile_for(make("gpu"), *avals, target=gpu)
      print(json.dumps({"target": gpu, "case": name, "kernels": report.custom_calls,
                        "argument_bytes": report.argument_bytes}), flush=True)
  x = jax.ShapeDtypeStruct((256, 4096), jnp.int8)
  huge = tiling.Blocks(tm=128, tn=256, tk=4096, num_stages=4)
  try:
    aot.compile_for(lambda x, w: int8_matmul(x, w, backend="gpu", blocks=huge), x,
                    jax.ShapeDtypeStruct((4096, 4096), jnp.int8), target="h100")
    error = None
  except Exception as e:  # pylint: disable=broad-except
    error = str(e).splitlines()[0]
  print(json.dumps({"target": "h100", "case": "too_large_tile", "error": error}))


if __name__ == "__main__":
  main()
