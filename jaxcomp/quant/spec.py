"""The quantization spec: what to quantize, how finely, and how to pick scales.

`Quant` is a frozen, keyword-only dataclass validated on construction, so a bad value fails
where it is written (a config file, a recipe) with the field's name in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

Granularity = Literal["tensor", "channel", "group"]
ActGranularity = Literal["tensor", "token"]
Calibration = Literal["absmax", "percentile", "mse"]

GRANULARITIES = ("tensor", "channel", "group")
ACT_GRANULARITIES = ("tensor", "token")
CALIBRATIONS = ("absmax", "percentile", "mse")
Method = Literal["rtn", "gptq", "awq", "smoothquant"]
METHODS = ("rtn", "gptq", "awq", "smoothquant")
# Methods that solve for weights from calibration data (`jaxcomp.ptq`), not at run time.
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant")


class SpecError(ValueError):
  """A spec field holds a bad value; the message names the field."""


def known_fields(cls: type, d: Any) -> dict[str, Any]:
  """``d`` as a dict, or a `SpecError` naming the first key that is not a field of ``cls``."""
  d = dict(d)
  names = {f.name for f in dataclasses.fields(cls) if f.name != "_"}
  unknown = sorted(set(d) - names)
  if unknown:
    raise SpecError(f"{cls.__name__} has no field {unknown[0]!r} "
                    f"(fields: {', '.join(sorted(names))})")
  return d


def _check_bits(owner: str, name: str, value: Any, lo: int, hi: int, *, optional: bool) -> None:
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    allowed = f"an int in [{lo}, {hi}]" + (" or None" if optional else "")
    raise SpecError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise SpecError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_bool(owner: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise SpecError(f"{owner}.{name} must be a bool, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quant:
  """How one layer is quantized (weights, and optionally activations and gradients).

  Weights are quantized along the layer's output channels: one scale per output channel
  (``granularity="channel"``), per tensor, or per group of ``group`` consecutive input
  (contraction) elements. Activations are quantized dynamically per token (one scale per row
  of the matmul's left operand) or per tensor. With ``learn_scale`` the weight (and
  per-tensor activation) step sizes are trained with LSQ (Esser et al., 2020).

  Example:
    >>> import jaxcomp as jc
    >>> jc.Quant(w_bits=4, group=128)                    # w4 weight-only, g128
    Quant(w_bits=4, a_bits=None, ...)
    >>> jc.Quant(w_bits=8, a_bits=8, learn_scale=True)   # w8a8 QAT with LSQ
    Quant(w_bits=8, a_bits=8, ...)
    >>> jc.Quant(w_bits=4, group=128, method="gptq", act_order=True)  # for jc.ptq
    Quant(w_bits=4, a_bits=None, ...)

  ``method`` picks the post-training solver used by `jaxcomp.ptq` (``"rtn"``: round to
  nearest; ``"gptq"``: Frantar et al., 2022; ``"awq"``: activation-aware scaling, Lin et al.,
  2023; ``"smoothquant"``: activation-to-weight difficulty migration for W8A8, Xiao et al.,
  2022). `jaxcomp.quantize` (QAT) calibrates at run time and accepts ``"rtn"`` only.
  """

  w_bits: int = 8  # weight bits, 2..8.
  a_bits: int | None = None  # activation bits, 4..8; None keeps activations in float.
  g_bits: int | None = None  # bits of the output gradient in the two backward dots; None: float.
  w_symmetric: bool = True  # symmetric weights (no zero point).
  full_range: bool = False  # symmetric weights on the full signed grid {-8..7} (4 bits), s = absmax / 7.5.
  a_symmetric: bool = True  # symmetric activations (no zero point).
  granularity: Granularity = "channel"  # weight scale: per tensor, output channel or group.
  group: int | None = None  # group size along the contraction axis; implies granularity="group".
  a_granularity: ActGranularity = "token"  # activation scale: per token (row) or per tensor.
  calibration: Calibration = "absmax"  # how weight scales are chosen: absmax, percentile, mse.
  percentile: float = 99.9  # used by calibration="percentile", in (0, 100].
  learn_scale: bool = False  # LSQ: train the step sizes (Esser et al., 2020).
  method: Method = "rtn"  # PTQ solver: rtn, gptq, awq, smoothquant (see `jaxcomp.ptq`).
  act_order: bool = False  # gptq: quantize input features by decreasing Hessian diagonal.
  damp: float = 0.01  # gptq: dampening, a fraction of mean(diag(H)) added to the diagonal.
  smooth_alpha: float = 0.5  # smoothquant: migration strength alpha in [0, 1].

  def __post_init__(self) -> None:
    o = "Quant"
    _check_bits(o, "w_bits", self.w_bits, 2, 8, optional=False)
    _check_bits(o, "a_bits", self.a_bits, 4, 8, optional=True)
    _check_bits(o, "g_bits", self.g_bits, 4, 8, optional=True)
    _check_bool(o, "w_symmetric", self.w_symmetric)
    _check_bool(o, "a_symmetric", self.a_symmetric)
    _check_bool(o, "full_range", self.full_range)
    if self.full_range and not self.w_symmetric:
      raise SpecError("Quant.full_range=True is a symmetric grid; drop it or w_symmetric=False")
    _check_bool(o, "learn_scale", self.learn_scale)
    _check_choice(o, "granularity", self.granularity, GRANULARITIES)
    _check_choice(o, "a_granularity", self.a_granularity, ACT_GRANULARITIES)
    _check_choice(o, "calibration", self.calibration, CALIBRATIONS)
    _check_choice(o, "method", self.method, METHODS)
    _check_bool(o, "act_order", self.act_order)
    for name, lo, hi, lo_open in (("damp", 0.0, 1.0, True), ("smooth_alpha", 0.0, 1.0, False)):
      v = getattr(self, name)
      bad = isinstance(v, bool) or not isinstance(v, (int, float))
      if bad or not (lo < v <= hi if lo_open else lo <= v <= hi):
        interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise SpecError(f"Quant.{name} must be a number in {interval}, got {v!r}")
      object.__setattr__(self, name, float(v))
    if self.group is not None:
      if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
        raise SpecError(f"Quant.group must be a positive int or None, got {self.group!r}")
      if self.granularity == "tensor":
        raise SpecError("Quant.group is set but Quant.granularity is 'tensor'; drop one of them")
      object.__setattr__(self, "granularity", "group")
    elif self.granularity == "group":
      raise SpecError("Quant.group must be set when Quant.granularity is 'group'")
    if (
        isinstance(self.percentile, bool)
        or not isinstance(self.percentile, (int, float))
        or not 0.0 < self.percentile <= 100.0
    ):
      raise SpecError(f"Quant.percentile must be a number in (0, 100], got {self.percentile!r}")
    object.__setattr__(self, "percentile", float(self.percentile))
    if self.a_bits is None and self.g_bits is not None:
      raise SpecError("Quant.g_bits needs Quant.a_bits: the int8 backward dots use both operands")
    if self.learn_scale and not self.w_symmetric:
      raise SpecError("Quant.learn_scale=True needs w_symmetric=True (LSQ learns a step, no zero point)")
    if self.method in ("awq", "smoothquant") and not self.w_symmetric:
      raise SpecError(f"Quant.method={self.method!r} needs w_symmetric=True (solved weights keep "
                      "a fixed symmetric step per channel/group)")
    if self.method in CALIBRATED_METHODS and self.granularity == "tensor":
      raise SpecError(f"Quant.method={self.method!r} needs granularity 'channel' or 'group'")
    if self.method == "smoothquant" and self.a_bits is None:
      raise SpecError("Quant.method='smoothquant' migrates activation outliers for W8A8: set a_bits")
    if self.method == "awq" and self.a_bits is not None:
      raise SpecError("Quant.method='awq' is weight-only (its search assumes float activations); "
                      "drop a_bits or use method='smoothquant'")

  @property
  def int_dot(self) -> bool:
    """Whether the forward pass runs a real integer dot (both operands quantized, symmetric)."""
    return self.a_bits is not None and self.w_symmetric and self.a_symmetric

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain dict (round-trips through `Quant(**d)`)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Any) -> "Quant":
    """Builds a spec from a mapping, rejecting unknown keys by name."""
    return cls(**known_fields(cls, d))


def weight_scale_shape(
    kernel_shape: Sequence[int], contracting: Sequence[int], spec: Quant
) -> tuple[int, ...]:
  """Shape of a kernel's weight step (LSQ-learned or solved by PTQ), in the kernel's own layout.

  One grouping rule for every path: the contracting axes are flattened, in order, into K (the
  layout of `jaxcomp.QArray` and of the quantized dot's canonical frame). Per channel every
  contracting axis collapses to 1; per group the *last* contracting axis holds the
  ``ceil(K / group)`` groups and the other contracting axes are 1, so a group may span several
  axes (e.g. two heads of a ``(H, Dh, D)`` out-projection with ``Dh = 64`` and ``group=128``,
  or the ``3 x 3 x Cin`` taps of a convolution); per tensor every axis is 1. When ``group``
  does not divide K the last group is shorter (as in GPTQ's reference; e.g. SmolLM2's
  576 = 4 x 128 + 64), which needs absmax calibration (zero padding would bias a percentile or
  MSE search).

  Example:
    >>> weight_scale_shape((512, 2048), (0,), jc.Quant(w_bits=4, group=128))
    (4, 2048)
    >>> weight_scale_shape((4, 64, 256), (0, 1), jc.Quant(w_bits=4, group=128))
    (1, 2, 256)
  """
  nd = len(kernel_shape)
  contracting = tuple(a % nd for a in contracting)
  if spec.granularity == "tensor":
    return (1,) * nd
  shape = list(kernel_shape)
  for a in contracting:
    shape[a] = 1
  if spec.granularity == "channel":
    return tuple(shape)
  k = 1
  for a in contracting:
    k *= kernel_shape[a]
  if k % spec.group and spec.calibration != "absmax":
    raise SpecError(
        f"Quant.group={spec.group} does not divide the contraction axis of size {k} (the "
        f"contracting axes {contracting} of kernel shape {tuple(kernel_shape)}, flattened); a "
        f"shorter last group needs calibration='absmax'")
  shape[contracting[-1]] = -(-k // spec.group)
  return tuple(shape)
