"""Shared plumbing of the kernels: which backend runs, padding, interpret settings, errors."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Backends a kernel call can take. "tpu" / "gpu" are the Pallas kernels (Mosaic / Triton);
# "xla" is the pure-XLA reference with the same signature and the same results.
BACKENDS = ("tpu", "gpu", "xla")
ENV_BACKEND = "JAXCOMP_KERNEL_BACKEND"
ENV_INTERPRET = "JAXCOMP_KERNEL_INTERPRET"


# What an ahead-of-time compile targets (`compiling_for`): (platform, TPU generation or None).
_TARGET: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "pallas_kernels_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str, generation: str | None = None) -> Iterator[None]:
  """Traces inside this context are for ``platform`` ("tpu", "cuda", "cpu"), not the host's:
  ``backend="auto"`` resolves to that platform's kernels, the kernels are not interpreted, and
  TPU tiles are chosen for ``generation`` (v4, v5e, v5p, v6e). For compiling on a host without
  the hardware (`jaxcomp.aot`).

  Example::

    with compiling_for("tpu", "v6e"):
      compiled = jax.jit(f).lower(*avals_on_tpu_devices).compile()
  """
  if platform not in ("tpu", "cuda", "cpu"):
    raise ValueError(f"platform must be 'tpu', 'cuda' or 'cpu'; got {platform!r}")
  token = _TARGET.set((platform, generation))
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  """The platform programs are traced for: the `compiling_for` target's, else the default
  device's ("cpu", "tpu", "gpu", ...)."""
  target = _TARGET.get()
  return target[0] if target is not None else jax.default_backend()


def target_generation() -> str | None:
  """The TPU generation of the `compiling_for` target, or None outside one."""
  target = _TARGET.get()
  return None if target is None else target[1]


def resolve_backend(backend: str | None) -> str:
  """The backend a call runs on: ``backend`` if given, else ``$JAXCOMP_KERNEL_BACKEND``, else
  the target platform (`target_platform`: tpu -> Mosaic kernel, gpu -> Triton kernel, else
  XLA)."""
  chosen = backend or os.environ.get(ENV_BACKEND) or "auto"
  if chosen == "auto":
    platform = target_platform()
    return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda", "rocm") else "xla"
  if chosen not in BACKENDS:
    source = "backend" if backend else f"${ENV_BACKEND}"
    raise ValueError(f"{source} must be one of auto, {', '.join(BACKENDS)}; got {chosen!r}")
  return chosen


def resolve_interpret(interpret: bool | None, backend: str) -> bool:
  """``interpret`` if given, else ``$JAXCOMP_KERNEL_INTERPRET`` ("1" / "0"), else whether the
  kernel's hardware is absent (a TPU kernel forced on a CPU host runs in the interpreter;
  inside `compiling_for` the target's kernels are compiled, never interpreted)."""
  if interpret is not None:
    return bool(interpret)
  if _TARGET.get() is not None:
    return False
  env = os.environ.get(ENV_INTERPRET, "")
  if env:
    return env.lower() in ("1", "true", "yes")
  return backend != resolve_backend("auto")


def interpret_arg(backend: str, interpret: bool) -> Any:
  """The ``interpret=`` of `pl.pallas_call`: TPU semantics (`InterpretParams`) for Mosaic."""
  if not interpret:
    return False
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    return pltpu.InterpretParams()
  return True


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_to(x: Array, shape: tuple[int, ...]) -> Array:
  """Zero-pads ``x`` at the end of each axis up to ``shape`` (no-op when equal)."""
  pads = [(0, t - s) for s, t in zip(x.shape, shape)]
  if any(p for _, p in pads):
    return jnp.pad(x, pads)
  return x


def check(cond: bool, message: str) -> None:
  """Raises ``ValueError(message)`` unless ``cond`` (bad input, before any kernel is traced)."""
  if not cond:
    raise ValueError(message)


def apply_activation(y: Array, activation: str | None) -> Array:
  """The fused epilogue's activation: None, "relu", "gelu" (tanh form) or "silu"."""
  if activation is None:
    return y
  if activation == "relu":
    return jnp.maximum(y, 0.0)
  if activation == "gelu":
    return jax.nn.gelu(y, approximate=True)
  if activation == "silu":
    return y * jax.nn.sigmoid(y)
  raise ValueError(f"activation must be None, 'relu', 'gelu' or 'silu'; got {activation!r}")


ACTIVATIONS = (None, "relu", "gelu", "silu")


# Custom-call targets that prove a lowering went through each Pallas backend.
CUSTOM_CALL_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def export_for(fn: Any, *args: Any, platform: str) -> str:
  """Lowers ``jax.jit(fn)(*args)`` for ``platform`` ("tpu" or "cuda") with `jax.export` and
  returns the StableHLO text. Works on any host: lowering runs the Pallas -> Mosaic / Triton
  code generation; compiling the kernel itself only happens on the device.

  Example::

    text = export_for(lambda x, w: int8_matmul(x, w, backend="tpu", interpret=False),
                      x_aval, w_aval, platform="tpu")
    assert "tpu_custom_call" in text
  """
  from jax import export  # pylint: disable=import-outside-toplevel
  checks = ([export.DisabledSafetyCheck.custom_call(CUSTOM_CALL_TARGETS["cuda"])]
            if platform == "cuda" else [])
  exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()
