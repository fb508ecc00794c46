"""Block sizes from a roofline: per TPU generation (v4, v5e, v5p, v6e) and for GPUs.

A matmul ``(M, K) @ (K, N)`` on a grid of ``(tm, tn, tk)`` tiles reads the activations once
per column of output tiles and the weights once per row of output tiles:

    bytes = M K bx ceil(N / tn) + K N bw ceil(M / tm) + M N bo
    time  = max(2 M N K / peak, bytes / hbm_bw) + steps * step_overhead

(``bx``, ``bw``, ``bo``: bytes per activation, weight and output element; a weight-only int4
kernel has ``bw = 1/2``). Tiles must fit 3/4 of the scoped VMEM double-buffered
(``2 (tm tk bx + tk tn bw) + tk tn bt + tm tn (4 + 2 bo)`` for the inputs, in-kernel weight
temporaries ``bt``, the int32/f32 accumulator and the output), keep the TPU layout rules
(last two block dims multiples of (8, 128); 32 rows for int8, 16 for bf16 operands) and be
multiples of the MXU width. `tpu_blocks` picks the tiles of
lowest modelled time among those candidates; the chip's numbers come from
``pltpu.get_tpu_info_for_chip`` (VMEM, HBM bandwidth, peak ops, MXU size).

    >>> tpu_blocks("v5e", m=512, n=4096, k=4096, x_bytes=1, w_bytes=1).tm
    512
"""

from __future__ import annotations

import dataclasses
import functools
import os

from pallas_kernels import _common

# Per-grid-step overhead of a Pallas TPU kernel (pipeline bookkeeping, DMA issue), from the
# Pallas TPU docs' guidance that each step costs ~0.35 us.
_STEP_OVERHEAD_S = 0.35e-6
# Scoped VMEM the compiler grants a kernel by default (Mosaic: 16 MiB before v6, 32 MiB on
# v6e). The tiles stay within 3/4 of it (the rest is headroom for Mosaic's own scratch and
# spills), so no vmem_limit_bytes is needed.
_SCOPED_VMEM = {"v4": 16 << 20, "v5e": 16 << 20, "v5p": 16 << 20, "v6e": 32 << 20}
GENERATIONS = tuple(_SCOPED_VMEM)
ENV_GENERATION = "JAXCOMP_TPU_GENERATION"


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes of one kernel call (rows of x, columns of w, contraction), and GPU launch
  parameters (ignored on TPU)."""

  tm: int
  tn: int
  tk: int
  num_warps: int = 4
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the roofline needs of a TPU generation (per device: megacore chips count both
  TensorCores)."""

  name: str
  peak_ops: float  # int8 ops/s where the MXU has an int8 mode, else bf16 (see int8_mxu)
  peak_bf16: float
  hbm_bw: float  # bytes/s
  mxu: int  # MXU width (128 before v6e, 256 on v6e)
  vmem_budget: int  # bytes
  int8_mxu: bool = True  # False on v4: int8 tiles run on the bf16 MXU (int8_matmul)


@functools.cache
def chip(generation: str) -> Chip:
  """The roofline numbers of a TPU generation, from JAX's own chip table.

  Example:
    >>> chip("v6e").mxu
    256
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  versions = {"v4": "TPU_V4", "v5e": "TPU_V5E", "v5p": "TPU_V5P", "v6e": "TPU_V6E"}
  if generation not in versions:
    raise ValueError(f"TPU generation must be one of {', '.join(versions)}; got {generation!r}")
  version = getattr(pltpu.ChipVersion, versions[generation])
  cores = version.num_physical_tensor_cores_per_chip
  info = pltpu.get_tpu_info_for_chip(version, 1)
  bf16 = info.bf16_ops_per_second * cores
  # v4's MXU has no int8 mode (Mosaic rejects an int8 matmul for it): `int8_matmul` converts
  # its int8 tiles to bf16 in VMEM there, so int8 runs at the bf16 rate.
  int8 = info.int8_ops_per_second * cores
  return Chip(generation, int8 or bf16, bf16, info.mem_bw_bytes_per_second * cores,
              info.mxu_column_size, _SCOPED_VMEM[generation] * 3 // 4, int8_mxu=int8 > 0)


def current_generation() -> str:
  """The TPU generation to tile for: the `compiling_for` target's, ``$JAXCOMP_TPU_GENERATION``,
  the attached TPU, or v5e."""
  target = _common.target_generation()
  if target:
    return target
  env = os.environ.get(ENV_GENERATION)
  if env:
    return env
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "tpu":
    kind = jax.devices()[0].device_kind.lower().replace(" ", "")
    for gen, tags in (("v6e", ("v6",)), ("v5p", ("v5p",)), ("v5e", ("v5lite", "v5e")),
                      ("v4", ("v4",))):
      if any(t in kind for t in tags):
        return gen
  return "v5e"


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pow2_range(lo: int, hi: int) -> list[int]:
  out, v = [], lo
  while v <= hi:
    out.append(v)
    v *= 2
  return out or [lo]


@dataclasses.dataclass(frozen=True)
class Roofline:
  """The modelled cost of one kernel call with given tiles."""

  time_s: float  # max(compute, memory) + grid steps x step overhead
  compute_s: float  # padded flops / peak
  memory_s: float  # HBM traffic (operands re-read per tile row / column) / bandwidth
  hbm_bytes: float
  steps: int
  vmem_bytes: float  # double-buffered inputs + accumulator + output tile

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"


def _model(c: Chip, ops: float, b: Blocks, m: int, n: int, k: int, x_bytes: float,
           w_bytes: float, out_bytes: float, w_temp_bytes: float = 0,
           x_temp_bytes: float = 0, acc_temp_bytes: float = 0) -> Roofline:
  gm, gn, gk = _cdiv(m, b.tm), _cdiv(n, b.tn), _cdiv(k, b.tk)
  mp, np_, kp = gm * b.tm, gn * b.tn, gk * b.tk
  traffic = mp * kp * x_bytes * gn + kp * np_ * w_bytes * gm + mp * np_ * out_bytes
  compute, memory = 2 * mp * np_ * kp / ops, traffic / c.hbm_bw
  vmem = (2 * (b.tm * b.tk * x_bytes + b.tk * b.tn * w_bytes) + b.tk * b.tn * w_temp_bytes
          + b.tm * b.tk * x_temp_bytes + b.tm * b.tn * (4 + acc_temp_bytes + 2 * out_bytes))
  steps = gm * gn * gk
  return Roofline(max(compute, memory) + steps * _STEP_OVERHEAD_S, compute, memory, traffic,
                  steps, vmem)


def roofline(generation: str, blocks: Blocks, *, m: int, n: int, k: int, x_bytes: float,
             w_bytes: float, out_bytes: float = 2, peak: str = "int8",
             w_temp_bytes: float = 0, x_temp_bytes: float = 0,
             acc_temp_bytes: float = 0) -> Roofline:
  """The model `tpu_blocks` minimises, for given tiles (for tables and docs).

  Example:
    >>> r = roofline("v5e", Blocks(512, 1024, 1024), m=512, n=4096, k=4096, x_bytes=1,
    ...              w_bytes=1)
    >>> r.bound, r.steps
    ('compute', 16)
  """
  c = chip(generation)
  return _model(c, c.peak_ops if peak == "int8" else c.peak_bf16, blocks, m, n, k, x_bytes,
                w_bytes, out_bytes, w_temp_bytes, x_temp_bytes, acc_temp_bytes)


@functools.cache
def tpu_blocks(generation: str, *, m: int, n: int, k: int, x_bytes: float, w_bytes: float,
               out_bytes: float = 2, row_align: int = 32, k_align: int = 128,
               peak: str = "int8", w_temp_bytes: float = 0, x_temp_bytes: float = 0,
               acc_temp_bytes: float = 0, k_max: int | None = None) -> Blocks:
  """The roofline-optimal ``(tm, tn, tk)`` for a ``(m, k) @ (k, n)`` kernel on a generation.

  Args:
    generation: "v4", "v5e", "v5p" or "v6e".
    m, n, k: problem size (padded up to the tiles by the caller).
    x_bytes, w_bytes, out_bytes: bytes per element of activations, weights (0.5 for int4)
      and output.
    row_align: multiple for ``tm`` (32 for int8 activations, 16 for bf16).
    k_align: multiple for ``tk`` (e.g. the quantization group, or 256 for packed int4).
    peak: "int8" or "bf16": which MXU rate bounds the compute.
    w_temp_bytes: VMEM per weight-tile element for in-kernel temporaries (int4: the
      unpacked f32 and the cast copy, 6).
    x_temp_bytes, acc_temp_bytes: the same per activation-tile and per output-tile element
      (int8 on v4: the bf16 copy of the x tile, 2; the f32 partial sum, its int32 cast and
      the new accumulator, 12).
    k_max: largest ``tk`` (int8 on v4's bf16 MXU: 1024, where the f32 sum of a tile is
      still exact).

  Returns:
    `Blocks` with ``tm`` a multiple of ``row_align`` and ``tn``, ``tk`` multiples of 128 and
    of the MXU width where the problem is that large.
  """
  c = chip(generation)
  ops = c.peak_ops if peak == "int8" else c.peak_bf16
  m_pad = _cdiv(m, row_align) * row_align
  tms = sorted({min(t, m_pad) for t in _pow2_range(row_align, 1024)})
  lane = max(128, min(c.mxu, _cdiv(n, 128) * 128))
  tns = sorted({min(t, _cdiv(n, lane) * lane) for t in _pow2_range(lane, 4096)})
  kq = max(k_align, 128)
  tks = sorted({min(t, _cdiv(k, kq) * kq) for t in _pow2_range(kq, k_max or 8192)})
  best, best_t = None, float("inf")
  for tm in tms:
    for tn in tns:
      for tk in tks:
        r = _model(c, ops, Blocks(tm, tn, tk), m, n, k, x_bytes, w_bytes, out_bytes,
                   w_temp_bytes, x_temp_bytes, acc_temp_bytes)
        if r.vmem_bytes > c.vmem_budget:
          continue
        t = r.time_s
        if t < best_t * (1 - 1e-9):
          best, best_t = Blocks(tm, tn, tk), t
  if best is None:
    raise ValueError(f"no tile of ({m}, {k}) @ ({k}, {n}) fits {generation}'s VMEM budget")
  return best


def check_tpu_blocks(kernel: str, generation: str, blocks: Blocks, *, x_bytes: float,
                     w_bytes: float, out_bytes: float, w_temp_bytes: float = 0,
                     x_temp_bytes: float = 0, acc_temp_bytes: float = 0) -> None:
  """Raises a one-line ValueError if tiles given by hand need more VMEM than ``generation``
  grants a kernel (`tpu_blocks` never picks such tiles; the compiler would fail with an
  out-of-VMEM error deep in the compile).

  Example:
    >>> check_tpu_blocks("int8_matmul", "v5e", Blocks(256, 256, 512), x_bytes=1, w_bytes=1,
    ...                  out_bytes=2)
  """
  c = chip(generation)
  need = _model(c, c.peak_ops, blocks, blocks.tm, blocks.tn, blocks.tk, x_bytes, w_bytes,
                out_bytes, w_temp_bytes, x_temp_bytes, acc_temp_bytes).vmem_bytes
  if need > c.vmem_budget:
    raise ValueError(
        f"{kernel}: tiles (tm={blocks.tm}, tn={blocks.tn}, tk={blocks.tk}) need "
        f"{need / 2**20:.1f} MiB of VMEM; {generation} grants a kernel "
        f"{c.vmem_budget / 2**20:.0f} MiB (3/4 of its scoped VMEM): use smaller tiles")


def gpu_blocks(m: int, n: int, k: int, *, tk: int = 64) -> Blocks:
  """Triton tiles: ``tm`` the next power of two of ``m`` in [16, 128] (tl.dot needs >= 16),
  ``tn`` 128, ``tk`` as given (a power of two >= 16); 4 warps, 3 pipeline stages.

  Example:
    >>> gpu_blocks(1, 4096, 4096).tm
    16
  """
  del n, k
  tm = 16
  while tm < min(m, 128):
    tm *= 2
  return Blocks(tm, 128, tk, num_warps=4, num_stages=3)
