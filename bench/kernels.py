"""Pallas kernels vs the XLA path at LLM shapes: TFLOP/s (GB/s for w4a16 decode) and % of peak.

On a TPU or GPU, for each kernel (int8 W8A8, int4 w4a16 group 128, block-sparse 128x128 tiles
at 75% sparsity) and each shape M in {1, 16, 512, 4096}, K = N in {2048, 4096, 8192}, times
the Pallas kernel and the XLA reference side by side (jit, median of --reps runs after a
warm-up) and prints: time, TFLOP/s (useful flops: the sparse kernel counts only stored tiles),
GB/s of the operands for memory-bound decode shapes (M <= 16), the fraction of the device's
peak (compute or HBM bandwidth, whichever bounds the shape), and kernel / XLA speed-up.

On a CPU host there is nothing to time -- the Pallas kernels only run interpreted -- so it runs
the interpret-mode correctness sweep instead (every kernel, both backends, against its
reference at small ragged shapes) and says so.

``--tiles`` prints, on any host, the tiles `pallas_kernels.tiling` picks per TPU generation
at those shapes, with the roofline model's time, bound and VMEM use (docs/kernels.md).

    python bench/kernels.py                 # TPU / GPU: the timing table; CPU: the sweep
    python bench/kernels.py --m 1 16 --kn 4096
    python bench/kernels.py --tiles
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pallas_kernels as pk  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels import tiling  # noqa: E402  pylint: disable=wrong-import-position

# Dense peak numbers of the GPUs we may be lent (NVIDIA datasheets: H100 SXM5 / H200 SXM5,
# dense tensor-core rates without sparsity).
_GPU_PEAKS = {  # name fragment: (int8 ops/s, bf16 flop/s, HBM bytes/s)
    "H200": (1979e12, 989e12, 4.8e12),
    "H100": (1979e12, 989e12, 3.35e12),
    "A100": (624e12, 312e12, 2.0e12),
}


def _peaks() -> tuple[float, float, float, str]:
  dev = jax.devices()[0]
  if dev.platform == "tpu":
    c = tiling.chip(tiling.current_generation())
    return c.peak_ops, c.peak_bf16, c.hbm_bw, f"TPU {c.name}"
  for key, (i8, bf16, bw) in _GPU_PEAKS.items():
    if key in dev.device_kind:
      return i8, bf16, bw, dev.device_kind
  raise SystemExit(f"no peak numbers for {dev.device_kind}; add them to _GPU_PEAKS")


def _time(fn, *args, reps: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _cases(m: int, kn: int, rng: np.random.Generator):
  """(name, kernel fn, xla fn, args, useful flops, operand bytes, peak kind) per kernel."""
  x8 = jnp.asarray(rng.integers(-127, 128, (m, kn)), jnp.int8)
  w8 = jnp.asarray(rng.integers(-127, 128, (kn, kn)), jnp.int8)
  xs, ws = jnp.ones((m,), jnp.float32), jnp.ones((kn,), jnp.float32)
  flops = 2 * m * kn * kn
  yield ("int8", lambda *a: pk.int8_matmul(*a, w_layout="nk"),
         lambda *a: pk.int8_matmul(*a, w_layout="nk", backend="xla"), (x8, w8, xs, ws), flops,
         m * kn + kn * kn + 2 * m * kn, "int8")
  xb = jnp.asarray(rng.standard_normal((m, kn)), jnp.bfloat16)
  w4 = jnp.asarray(rng.integers(-128, 128, (kn // 2, kn)), jnp.int8)
  s4 = jnp.asarray(rng.uniform(0.01, 0.1, (kn // 128, kn)), jnp.float32)
  yield ("int4_g128", lambda *a: pk.int4_matmul(*a, group=128),
         lambda *a: pk.int4_matmul(*a, group=128, backend="xla"), (xb, w4, s4), flops,
         2 * m * kn + kn * kn // 2 + 4 * s4.size + 2 * m * kn, "bf16")
  gn, gk = kn // 128, kn // 128
  nnz = gk // 4  # 75% of the 128x128 tiles pruned, evenly per output block column
  vals = jnp.asarray(rng.standard_normal((gn, nnz, 128, 128)), jnp.bfloat16)
  idx = jnp.asarray(np.sort(np.stack([rng.choice(gk, nnz, replace=False) for _ in range(gn)]),
                            axis=1), jnp.int32)
  cnt = jnp.full((gn,), nnz, jnp.int32)
  yield ("block_sparse_75", lambda *a: pk.block_sparse_matmul(*a, n=kn),
         lambda *a: pk.block_sparse_matmul(*a, n=kn, backend="xla"), (xb, vals, idx, cnt),
         2 * m * gn * nnz * 128 * 128, 2 * m * kn + vals.size * 2 + 2 * m * kn, "bf16")


def timing_table(ms: list[int], kns: list[int], reps: int) -> None:
  int8_peak, bf16_peak, bw, name = _peaks()
  rng = np.random.default_rng(0)
  print(f"{name}: peak int8 {int8_peak / 1e12:.0f} TOPS, bf16 {bf16_peak / 1e12:.0f} TFLOP/s, "
        f"HBM {bw / 1e9:.0f} GB/s; median of {reps} runs\n")
  print("| kernel | M | K=N | kernel us | XLA us | speed-up | TFLOP/s | GB/s | % of peak |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for kn in kns:
    for m in ms:
      for name_k, kernel, xla, args, flops, nbytes, kind in _cases(m, kn, rng):
        tk, tx = _time(kernel, *args, reps=reps), _time(xla, *args, reps=reps)
        peak = int8_peak if kind == "int8" else bf16_peak
        bound = max(flops / peak, nbytes / bw)  # the roofline time of the shape
        print(f"| {name_k} | {m} | {kn} | {tk * 1e6:.1f} | {tx * 1e6:.1f} | {tx / tk:.2f} | "
              f"{flops / tk / 1e12:.1f} | {nbytes / tk / 1e9:.0f} | "
              f"{100 * bound / tk:.0f}% |", flush=True)


def interpret_sweep() -> None:
  rng = np.random.default_rng(0)
  rows = []
  for backend in ("tpu", "gpu"):
    for m, k, n in ((1, 256, 128), (5, 300, 130), (33, 512, 260)):
      x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
      w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
      got = pk.int8_matmul(x, w, out_dtype=jnp.int32, backend=backend, interpret=True)
      exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
      rows.append(("int8", backend, (m, k, n), "bit-exact" if np.array_equal(got, exact)
                   else "MISMATCH"))
    for m, k, n, g in ((1, 256, 128, 32), (7, 1024, 200, 128), (3, 576, 130, 64)):
      q = jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8)
      s = jnp.asarray(rng.uniform(0.01, 0.1, (k // g, n)), jnp.float32)
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      args = (x, pk.pack_kn(q), s)
      got = pk.int4_matmul(*args, group=g, out_dtype=jnp.float32, backend=backend,
                           interpret=True)
      ref = pk.int4_matmul_reference(*args, group=g, out_dtype=jnp.float32)
      err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
      rows.append(("int4", backend, (m, k, n), f"max rel err {err:.1e}"))
    for m, k, n in ((4, 384, 256), (20, 512, 384)):
      gk, gn = -(-k // 128), -(-n // 128)
      nnz = max(gk // 2, 1)
      vals = jnp.asarray(rng.standard_normal((gn, nnz, 128, 128)), jnp.float32)
      idx = jnp.asarray(np.sort(np.stack([rng.choice(gk, nnz, replace=False)
                                          for _ in range(gn)]), axis=1), jnp.int32)
      cnt = jnp.asarray(rng.integers(0, nnz + 1, gn), jnp.int32)
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
      cnt = cnt.at[0].set(nnz)  # at least one stored tile
      got = pk.block_sparse_matmul(x, vals, idx, cnt, n=n, backend=backend, interpret=True)
      ref = pk.block_sparse_matmul_reference(x, vals, idx, cnt, n=n)
      err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
      rows.append(("block_sparse", backend, (m, k, n), f"max rel err {err:.1e}"))
  print("| kernel | backend (interpreted) | (M, K, N) | vs reference |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


def tiles_table(ms: list[int], kns: list[int]) -> None:
  """The tiles each TPU generation gets for int8 (W8A8) and int4 g128 (w4a16, bf16 x)."""
  int4_mod = importlib.import_module("pallas_kernels.int4_matmul")  # the module, not the fn
  int8_mod = importlib.import_module("pallas_kernels.int8_matmul")
  print("| gen | ridge int8 / bf16 (ops/B) | kernel | M | K=N | tm x tn x tk | steps | "
        "VMEM MiB | model us | bound |")
  print("|---|---:|---|---:|---:|---|---:|---:|---:|---|")
  for gen in tiling.GENERATIONS:
    os.environ[tiling.ENV_GENERATION] = gen
    c = tiling.chip(gen)
    ridge = f"{c.peak_ops / c.hbm_bw:.0f} / {c.peak_bf16 / c.hbm_bw:.0f}"
    for kn in kns:
      for m in ms:
        for name in ("int8", "int4_g128"):
          if name == "int8":  # v4: bf16 tiles of at most 1024 deep (no int8 MXU)
            kw = int8_mod.tpu_tile_bytes(gen)
            b = tiling.tpu_blocks(gen, m=m, n=kn, k=kn, k_max=None if c.int8_mxu else 1024,
                                  **kw)
          else:
            kw = dict(x_bytes=2, w_bytes=0.5, peak="bf16",
                      w_temp_bytes=int4_mod._DEQUANT_TEMP_BYTES)  # pylint: disable=protected-access
            b = int4_mod._tpu_blocks(m, kn, kn, 128, jnp.bfloat16)  # pylint: disable=protected-access
          r = tiling.roofline(gen, b, m=m, n=kn, k=kn, **kw)
          print(f"| {gen} | {ridge} | {name} | {m} | {kn} | {b.tm} x {b.tn} x {b.tk} | "
                f"{r.steps} | {r.vmem_bytes / 2**20:.1f} | {r.time_s * 1e6:.1f} | {r.bound} |")
  os.environ.pop(tiling.ENV_GENERATION, None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 512, 4096])
  parser.add_argument("--kn", type=int, nargs="+", default=[2048, 4096, 8192])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--tiles", action="store_true",
                      help="print the per-generation TPU tile table and exit")
  args = parser.parse_args()
  if args.tiles:
    tiles_table(args.m, args.kn)
    return
  platform = jax.default_backend()
  if platform in ("tpu", "gpu", "cuda"):
    timing_table(args.m, args.kn, args.reps)
    return
  print(f"{platform} host: the Pallas kernels run only interpreted here, so timings would "
        "measure the interpreter, not the kernels -- kernel timings need a TPU or GPU. "
        "Running the interpret-mode correctness sweep instead.\n")
  interpret_sweep()


if __name__ == "__main__":
  main()
