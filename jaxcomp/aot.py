"""Compiled for TPUs and GPUs that are not here: the real XLA:TPU (with Mosaic) and XLA:GPU
(with Triton and ptxas) compilers, run ahead of time on any host.

`target` names a chip or a slice (``"v5e"``, ``"v6e:2x2"``, ``"v5p:4x4x4"``, ``"a100"``,
``"h100"``) and gives compile-only devices; `compile_for` traces a function for it (the Pallas
kernels compiled, not interpreted, and tiled for that TPU generation: `pallas_kernels.
compiling_for`), compiles it, and reports what the compiler says of one device: HBM for
arguments, outputs, temporaries and code, and for TPUs its cost model (flops, bytes, the summed
``estimated_cycles`` of the fusions). Those are **compiler estimates**, not measurements.

TPU targets need ``libtpu`` (the version ``jax[tpu]`` pins: ``pip install -e '.[aot]'``). GPU
targets need the CUDA plugin of this jax and a ``ptxas`` (a CUDA toolkit's; no CUDA libraries):
``make aot-gpu`` puts the plugin in ``.venv/aot-gpu``, kept off the default path because every
jax process that finds it prints CUDA driver warnings; compile for GPUs in a process with
``PYTHONPATH=.venv/aot-gpu`` and ``JAX_PLATFORMS=cpu`` (there is no GPU to initialise). With
libtpu installed, ``JAX_PLATFORMS=cpu`` also keeps jax from trying to start a TPU.

Example::

    from jaxcomp import aot
    v5e = aot.target("v5e:2x2")
    x = jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16, sharding=v5e.sharding(("data", None)))
    compiled, report = aot.compile_for(step, x, target=v5e)
    print(report)          # HBM per device, fits in 16 GiB?, estimated cycles
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels

# TPU generations: topology prefix, the default single-chip topology, and JAX's chip name.
_TPUS = {"v4": ("v4", "1x1x1", "TPU_V4"), "v5e": ("v5e", "1x1", "TPU_V5E"),
         "v5p": ("v5p", "1x1x1", "TPU_V5P"), "v6e": ("v6e", "1x1", "TPU_V6E")}

# GPUs as XLA's GpuTargetConfigProto (text form) from the vendor's public spec sheets:
# NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB) and the A100 whitepaper (sm_80: 108 SMs,
# 164 KB shared memory per SM, 163 KB per block opt-in, 40 MB L2, 1410 MHz boost, 2039 GB/s);
# NVIDIA H100 datasheet and Hopper whitepaper (SXM5 80GB, sm_90: 132 SMs, 228 KB shared
# memory per SM, 227 KB per block opt-in, 50 MB L2, 1980 MHz boost, 3.35 TB/s). Registers:
# 64K 32-bit per SM and per block on both. Only fields the pinned jaxlib parses.
_GPUS = {
    "a100": dict(major=8, minor=0, sms=108, fpus=64, smem_core=167936, smem_optin=166912,
                 l2=41943040, clock_ghz=1.41, bandwidth=2039e9, memory=80 * 2**30,
                 title="NVIDIA A100-SXM4-80GB"),
    "h100": dict(major=9, minor=0, sms=132, fpus=128, smem_core=233472, smem_optin=232448,
                 l2=52428800, clock_ghz=1.98, bandwidth=3.35e12, memory=80 * 2**30,
                 title="NVIDIA H100 80GB HBM3"),
}


def gpu_target_config(name: str) -> str:
  """The ``GpuTargetConfigProto`` text XLA:GPU compiles against for GPU ``name`` (a100, h100).

  Example::

    text = gpu_target_config("h100")     # 'gpu_device_info { cuda_compute_capability {...'
  """
  if name not in _GPUS:
    raise ValueError(f"GPU must be one of {', '.join(_GPUS)}; got {name!r}")
  g = _GPUS[name]
  return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {g['major']} minor: {g['minor']} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {g['smem_optin']}
  shared_memory_per_core: {g['smem_core']}
  threads_per_core_limit: 2048
  core_count: {g['sms']}
  fpus_per_core: {g['fpus']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(g['bandwidth'])}
  l2_cache_size: {g['l2']}
  clock_rate_ghz: {g['clock_ghz']}
  device_memory_size: {g['memory']}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{g['title']}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile-only TPU slice or GPU: ``platform`` "tpu" / "cuda", ``generation`` the TPU
  generation (tiles of the kernels; None on GPU), ``topology`` as JAX names it."""

  name: str
  platform: str
  generation: str | None
  topology: str
  memory_per_core: int  # HBM bytes per TensorCore (TPU) or per GPU

  @property
  def hbm_bytes(self) -> int:
    """HBM of one device: v5p's megacore chips are one device of two TensorCores; the v4
    topology is compiled for as one device per TensorCore."""
    return self.memory_per_core * getattr(self.devices[0], "num_cores", 1)

  @property
  def devices(self) -> list[Any]:
    """The slice's compile-only devices (one per chip; v4 and v5p chips are one megacore
    device)."""
    return _devices(self.platform, self.topology, self.name)

  def mesh(self, shape: Mapping[str, int] | None = None) -> Mesh:
    """A mesh over all devices: ``shape`` maps axis names to sizes whose product is the device
    count (default: one axis ``"data"``).

    Example::

      aot.target("v5p:4x4x4").mesh({"data": 16, "model": 4})
    """
    devices = self.devices
    shape = dict(shape or {"data": len(devices)})
    if math.prod(shape.values()) != len(devices):
      raise ValueError(f"mesh {shape} has {math.prod(shape.values())} devices; {self.name} has "
                       f"{len(devices)}")
    return Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape))

  def sharding(self, spec: Sequence[Any] = (), mesh: Mesh | None = None) -> NamedSharding:
    """A `NamedSharding` on ``mesh`` (default: `mesh()`) with partition ``spec``."""
    return NamedSharding(mesh or self.mesh(), P(*spec))


def target(name: str) -> Target:
  """The compile-only target ``name``: a TPU chip (``v4``, ``v5e``, ``v5p``, ``v6e``), a TPU
  slice (``v5e:2x2``, ``v5p:4x4x4``, ``v6e:16x16``) or a GPU (``a100``, ``h100``).

  Example::

    aot.target("v5p:4x4x4").devices       # 64 compile-only TpuDevices
  """
  gen, _, topo = name.partition(":")
  if gen in _GPUS:
    if topo:
      raise ValueError(f"GPU targets are single devices; got {name!r}")
    return Target(name, "cuda", None, "1x1x1", _GPUS[gen]["memory"])
  if gen not in _TPUS:
    raise ValueError(f"target must be one of {', '.join(list(_TPUS) + list(_GPUS))}, or a TPU "
                     f"slice such as 'v5p:4x4x4'; got {name!r}")
  prefix, single, chip = _TPUS[gen]
  topo = topo or single
  if not re.fullmatch(r"\d+x\d+" + ("x\\d+" if single.count("x") == 2 else ""), topo):
    raise ValueError(f"{gen} topology must look like {single.replace('1', '2')}; got {topo!r}")
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, chip), 1)
  return Target(f"{gen}:{topo}", "tpu", gen, f"{prefix}:{topo}", info.hbm_capacity_bytes)


_named = target  # `compile_for`'s argument is also called target


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is absent
    return False


def missing(platform: str) -> str | None:
  """Why this process cannot compile for ``platform`` ("tpu", "cuda"), or None if it can.

  Example::

    if aot.missing("cuda"):
      print("skipping GPU targets:", aot.missing("cuda"))
  """
  if platform == "tpu":
    if not _installed("libtpu"):
      return "libtpu is not installed (pip install -e '.[aot]')"
    return None
  if platform != "cuda":
    raise ValueError(f"platform must be 'tpu' or 'cuda'; got {platform!r}")
  if not _installed("jax_plugins.xla_cuda12"):
    return ("the CUDA plugin of this jax is not on the path (make aot-gpu, then "
            "PYTHONPATH=.venv/aot-gpu)")
  if jax.config.jax_platforms != "cpu":
    return "GPU targets compile in a CPU-only process (set JAX_PLATFORMS=cpu)"
  if not (shutil.which("ptxas") or os.path.exists("/usr/local/cuda/bin/ptxas")
          or _installed("nvidia.cuda_nvcc")):
    return "XLA:GPU needs ptxas (a CUDA toolkit on PATH, or pip's nvidia-cuda-nvcc-cu12)"
  return None


@functools.cache
def _devices(platform: str, topology: str, name: str) -> list[Any]:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  why = missing(platform)
  if why:
    raise RuntimeError(f"cannot compile for {name}: {why}")
  if platform == "tpu":  # hosts of up to 2x2 chips, so that single chips and pairs exist too
    if jax.default_backend() != "tpu":  # compile-only: no TPU to hold, so let several
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # processes load libtpu at once
    dims = [int(d) for d in topology.partition(":")[2].split("x")]
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=topology,
        chips_per_host_bounds=[min(dims[0], 2), min(dims[1], 2), 1]).devices)
  return list(topologies.get_topology_desc(
      platform="cuda", topology=topology,
      target_config=gpu_target_config(name.partition(":")[0])).devices)


@dataclasses.dataclass(frozen=True)
class Report:
  """What the compiler says of one device of a compiled program (bytes; estimates)."""

  target: str
  devices: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int  # the device's HBM
  flops: float | None = None  # XLA's cost model (TPU only)
  bytes_accessed: float | None = None
  estimated_cycles: int | None = None  # summed over the fusions' backend configs (TPU)
  fusions: int = 0
  custom_calls: int = 0  # jaxcomp's Pallas kernels (Mosaic / Triton calls) in the program

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs - aliased (donated) + temporaries + code: the device's HBM use."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes, "fits": self.fits}

  def __str__(self) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    lines = [f"{self.target} ({self.devices} devices), per device (compiler estimates):",
             f"  arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}, "
             f"aliased {gib(self.alias_bytes)}, temporaries {gib(self.temp_bytes)}, "
             f"code {gib(self.code_bytes)}",
             f"  peak {gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM: "
             f"{'fits' if self.fits else 'does NOT fit'}"]
    if self.estimated_cycles is not None:
      lines.append(f"  {self.estimated_cycles:,} estimated cycles in {self.fusions} fusions, "
                   f"{self.custom_calls} Pallas kernels (no estimate), "
                   f"{(self.flops or 0) / 1e9:.1f} GFLOP")
    return "\n".join(lines)


_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')
_KERNELS = re.compile(r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton)"')
_OURS = "jaxcomp_"  # every pallas_kernels kernel is named jaxcomp_<kernel>


def report_of(compiled: Any, target: Target, devices: int = 1) -> Report:
  """The `Report` of a program compiled for ``target`` (``jax.stages.Compiled``) on
  ``devices`` of its devices.

  Example::

    report = aot.report_of(jax.jit(f).lower(*avals).compile(), aot.target("v5e"))
  """
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  cost = None
  if target.platform == "tpu":
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
  cycles = [int(c) for c in _CYCLES.findall(text)]
  return Report(
      target=target.name, devices=devices,
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, hbm_bytes=target.hbm_bytes,
      flops=None if cost is None else cost.get("flops"),
      bytes_accessed=None if cost is None else cost.get("bytes accessed"),
      estimated_cycles=sum(cycles) if target.platform == "tpu" else None,
      fusions=len(cycles),
      custom_calls=sum(1 for line in text.splitlines()
                       if _OURS in line and _KERNELS.search(line)))


def tracing_for(target: Target) -> Any:
  """A context in which jaxcomp's layers trace for ``target``: their Pallas kernels compiled
  (not interpreted) and tiled for its TPU generation (`pallas_kernels.compiling_for`). Lower
  and compile inside it.

  Example::

    with aot.tracing_for(aot.target("v6e")):
      compiled = jax.jit(step).lower(*abstract_args).compile()
  """
  return pallas_kernels.compiling_for(target.platform, target.generation)


def compile_for(fn: Callable[..., Any], *args: Any, target: Target | str,
                mesh_shape: Mapping[str, int] | None = None, in_shardings: Any = None,
                out_shardings: Any = None, donate_argnums: Sequence[int] = (),
                static_argnums: Sequence[int] = ()) -> tuple[Any, Report]:
  """Compiles ``fn(*args)`` for ``target`` and reports it: ``(jax.stages.Compiled, Report)``.

  ``args`` are arrays or `jax.ShapeDtypeStruct`s (nothing is allocated). The program runs on
  `Target.mesh` (``mesh_shape``; default: the first device alone); arguments without a
  sharding on the target's devices are replicated over it unless ``in_shardings`` says
  otherwise. The report is per device, for ``mesh_shape``'s devices. Traced inside `pallas_kernels.compiling_for`, so layers
  built with ``backend="auto"`` / the target's kernel backend compile their Pallas kernels.

  Example::

    x = jax.ShapeDtypeStruct((512, 4096), jnp.int8)
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.int8)
    compiled, report = compile_for(lambda x, w: int8_matmul(x, w, backend="tpu"), x, w,
                                   target="v6e")
    report.custom_calls      # 1: the Mosaic kernel
  """
  target = _named(target) if isinstance(target, str) else target
  mesh = target.mesh(mesh_shape) if mesh_shape else Mesh(np.array(target.devices[:1]), ("data",))
  on_target = set(mesh.devices.flat)

  def place(x):
    if not hasattr(x, "shape"):
      return x
    sharding = getattr(x, "sharding", None)
    if sharding is not None and set(sharding.device_set) <= on_target:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))

  if in_shardings is None:
    args = tuple(a if i in static_argnums else jax.tree.map(place, a)
                 for i, a in enumerate(args))
  jit_kw = dict(donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))
  if in_shardings is not None:
    jit_kw["in_shardings"] = in_shardings
  if out_shardings is not None:
    jit_kw["out_shardings"] = out_shardings
  with tracing_for(target), jax.set_mesh(mesh):
    compiled = jax.jit(fn, **jit_kw).lower(*args).compile()
  return compiled, report_of(compiled, target, devices=mesh.size)


def write_report(path: str, report: Report) -> None:
  """Writes ``report`` as JSON (for pod dry runs and benches)."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report.as_dict(), f, indent=2)
