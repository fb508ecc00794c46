"""The quantization spec: what to quantize, how finely, and how to pick scales.

`Quant` is a frozen, keyword-only dataclass validated on construction, so a bad value fails
where it is written (a config file, a recipe) with the field's name in the message.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

Granularity = Literal["tensor", "channel", "group"]
ActGranularity = Literal["tensor", "token"]
Calibration = Literal["absmax", "percentile", "mse"]

GRANULARITIES = ("tensor", "channel", "group")
# Element formats (`jaxcomp.quant.formats`): the integer grid of ``w_bits`` / ``a_bits``, fp8
# (E4M3, E5M2), and the micro-scaled FP4 formats (E2M1 values; MXFP4: an E8M0 scale per 32,
# NVFP4: an E4M3 scale per 16 and a float32 one per tensor).
W_FORMATS = ("int", "e4m3", "e5m2", "mxfp4", "nvfp4")
A_FORMATS = ("int", "e4m3", "e5m2")
FORMAT_BITS = {"e4m3": 8, "e5m2": 8, "mxfp4": 4, "nvfp4": 4}
FORMAT_GROUP = {"mxfp4": 32, "nvfp4": 16}
SCALE_DTYPES = ("float32", "bfloat16", "float16")
ACT_GRANULARITIES = ("tensor", "token")
CALIBRATIONS = ("absmax", "percentile", "mse")
SPEC_KINDS = ("quant", "sparsity", "lowrank")

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


# ------------------------------------------------------------------ solver methods of a spec
#
# A spec names its one-shot solver (``method``) and that solver's ``options``. The solvers
# live above this layer (`jaxcomp.oneshot.registry`, which imports Flax); at import the
# registry enters each one here, so that a spec checks its method and options where it is
# written. ``jaxcomp/__init__`` imports the registry, and Python runs it before any
# ``jaxcomp.*`` module, so the table is full before user code builds a spec.


class MethodInfo(Protocol):
  """What a spec needs to know of a registered solver (`jaxcomp.oneshot.solver.Solver`)."""

  name: str
  options: type | None  # the solver's options dataclass (one default per field), or None
  check: Callable[[Any], None] | None  # spec-level constraints: check(spec) -> SpecError
  smooths_inputs: bool  # the solved layer divides its input by a solved (K,) vector


_METHODS: dict[str, dict[str, MethodInfo]] = {kind: {} for kind in SPEC_KINDS}


def register_method(kind: str, info: MethodInfo) -> None:
  """Enters solver ``info`` as a valid ``method`` of the ``kind`` specs (the registry does).

  Example::

    register_method("quant", gptq.SOLVER)
  """
  if kind not in _METHODS:
    raise ValueError(f"spec kind must be one of {', '.join(SPEC_KINDS)}; got {kind!r}")
  _METHODS[kind][info.name] = info


def method_info(kind: str, name: str) -> MethodInfo:
  """The registered solver ``name`` of ``kind``, or a `SpecError` listing the registered ones.

  Example:
    >>> method_info("quant", "gptq").options.__name__
    'Options'
  """
  table = _METHODS[kind]
  if name not in table:
    owner = {"quant": "Quant", "sparsity": "Sparsity", "lowrank": "LowRank"}[kind]
    raise SpecError(f"{owner}.method must be one of {', '.join(table)}; got {name!r}")
  return table[name]


class SolverOptions(Mapping[str, Any]):
  """A spec's solver options: a read-only, hashable mapping of scalar values (so a spec stays
  a valid static argument of ``jax.jit``). Only the options set are held; the solver's options
  dataclass gives the defaults (`options_of`).

  Example:
    >>> SolverOptions({"act_order": True})["act_order"]
    True
  """

  def __init__(self, items: Mapping[str, Any] | None = None):
    self._d = dict(items or {})

  def __getitem__(self, key: str) -> Any:
    return self._d[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._d)

  def __len__(self) -> int:
    return len(self._d)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._d.items())))

  def __repr__(self) -> str:
    return repr(self._d)


def check_method(owner: str, kind: str, spec: Any) -> SolverOptions:
  """Checks ``spec.method`` and ``spec.options`` against the registered solver (names, values,
  the solver's constraints on the spec); returns the options as a `SolverOptions`."""
  info = method_info(kind, spec.method)
  opts = spec.options
  if not isinstance(opts, Mapping) and callable(getattr(opts, "items", None)):
    opts = dict(opts.items())  # e.g. an ml_collections.ConfigDict of a config file
  if not isinstance(opts, Mapping) or not all(isinstance(k, str) for k in opts):
    raise SpecError(f"{owner}.options must be a mapping of option names to values, got {opts!r}")
  for k, v in opts.items():
    if not (v is None or isinstance(v, (bool, int, float, str))):
      raise SpecError(f"{owner}.options[{k!r}] must be a bool, number or string, got {v!r}")
  fields = [] if info.options is None else [f.name for f in dataclasses.fields(info.options)]
  unknown = sorted(set(opts) - set(fields))
  if unknown:
    have = f"options: {', '.join(fields)}" if fields else "it takes no options"
    raise SpecError(f"{owner}.options has no {unknown[0]!r} for method {spec.method!r} ({have})")
  if info.options is not None:
    try:
      info.options(**opts)
    except SpecError as e:
      raise SpecError(f"{owner}.options: {e}") from None
  if info.check is not None:
    info.check(spec)
  return SolverOptions(opts)


def options_of(spec: Any) -> Any:
  """The options dataclass of the solver ``spec`` names, defaults filled (None if it has none).

  Example:
    >>> options_of(Quant(method="gptq", options={"act_order": True})).damp
    0.01
  """
  kind = {"Quant": "quant", "Sparsity": "sparsity", "LowRank": "lowrank"}[type(spec).__name__]
  info = method_info(kind, spec.method)
  return None if info.options is None else info.options(**spec.options)


def moved_to_options(moved: Mapping[str, tuple[str, str]]) -> Callable[[type], type]:
  """Class decorator for a spec whose old fields became solver options: ``moved`` maps an old
  field to ``(method, option)``. Writing the old field is a one-line `SpecError` that names the
  new place; `migrate_moved` carries such fields of a stored mapping (an old run's config)."""

  def deco(cls: type) -> type:
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
      for old, (method, new) in moved.items():
        if old in kwargs:
          raise SpecError(
              f"{cls.__name__}.{old} is now an option of method {method!r}: write "
              f"{cls.__name__}(method={method!r}, options={{{new!r}: {kwargs[old]!r}}})")
      init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls

  return deco


def migrate_moved(d: dict[str, Any], moved: Mapping[str, tuple[str, str]],
                  default_method: str) -> dict[str, Any]:
  """``d`` (a spec's fields as stored by an older version) with its moved fields turned into
  ``options`` of the method they belonged to; dropped for other methods, which ignored them.

  Example:
    >>> migrate_moved({"method": "gptq", "act_order": True}, {"act_order": ("gptq", "act_order")}, "rtn")
    {'method': 'gptq', 'options': {'act_order': True}}
  """
  d = dict(d)
  options = dict(d.get("options") or {})
  for old, (method, new) in moved.items():
    if old in d:
      value = d.pop(old)
      if d.get("method", default_method) == method:
        options.setdefault(new, value)
  if options:
    d["options"] = options
  return d


# Fields added to `Quant` after configs and fingerprints were first stored, with their defaults.
LATER_FIELDS = {"w_format": "int", "a_format": "int", "scale_dtype": "float32",
                "scaling": "dynamic", "amax_history": 16}

SCALINGS = ("dynamic", "delayed")

# Fields of earlier versions that are solver options now: old field -> (method, option).
QUANT_MOVED = {"act_order": ("gptq", "act_order"), "damp": ("gptq", "damp"),
               "smooth_alpha": ("smoothquant", "alpha")}


@moved_to_options(QUANT_MOVED)
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
    >>> jc.Quant(w_bits=4, group=128, method="gptq", options={"act_order": True})  # jc.ptq
    Quant(w_bits=4, a_bits=None, ...)

  ``w_format`` / ``a_format`` pick a float element format instead of the integer grid:
  ``"e4m3"`` / ``"e5m2"`` (fp8), and for weights ``"mxfp4"`` / ``"nvfp4"`` (E2M1 values in
  blocks of 32 / 16 sharing an E8M0 / E4M3 scale); they set ``w_bits`` / ``a_bits`` (and the
  group) themselves (`jaxcomp.quant.formats`, docs/quantization.md), e.g.
  ``jc.Quant(w_format="mxfp4", method="gptq")``.

  ``scale_dtype`` stores the weight scales (and zero points) in 16 bits (``"bfloat16"`` or
  ``"float16"``, as GPTQ's checkpoints do): each calibrated scale is rounded *up* to that
  dtype before quantizing (so nothing clips), in training and serving alike; w3g128 then
  costs 3.125 bits per weight instead of 3.25.

  ``scaling="delayed"`` (with ``a_granularity="tensor"``; for training) takes the per-tensor
  scales of the activations and of the output gradient (``g_bits``) from the absmax of the
  last ``amax_history`` steps, kept in the layer's `jaxcomp.AmaxHistory`, as fp8 training
  recipes do: quantizing then needs no pass over the tensor first, so XLA fuses it into the
  op that produces the tensor (docs/quantization.md). The layer records each step's absmax
  through the gradient of its history; `jaxcomp.calibrate_amax` fills it before the first
  step and `jaxcomp.amax_overwrite` makes an optimizer write it.

  ``method`` picks the post-training solver used by `jaxcomp.ptq`, one of the registered
  solvers of `jaxcomp.oneshot.registry` (``"rtn"``: round to nearest; ``"gptq"``: Frantar et
  al., 2022; ``"awq"``: activation-aware scaling, Lin et al., 2023; ``"smoothquant"``:
  activation-to-weight difficulty migration for W8A8, Xiao et al., 2022), and ``options`` sets
  that solver's options (gptq: ``act_order``, ``damp``, ``block_size``; awq: ``n_grid``,
  ``clip``; smoothquant: ``alpha``; each with one default in the solver's ``Options``).
  `jaxcomp.quantize` (QAT) calibrates at run time and accepts ``"rtn"`` only.
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
  w_format: str = "int"  # weight elements: int (the w_bits grid), e4m3 / e5m2 (fp8), mxfp4 / nvfp4.
  a_format: str = "int"  # activation elements: int (the a_bits grid) or e4m3 / e5m2 (fp8).
  scale_dtype: str = "float32"  # stored weight scales (and zero points): float32, bfloat16, float16.
  scaling: str = "dynamic"  # activation / gradient scales: of this step's tensor, or delayed (past steps').
  amax_history: int = 16  # scaling="delayed": steps of absmax kept; the scale is their max / qmax.
  method: str = "rtn"  # PTQ solver: rtn, gptq, awq, smoothquant (see `jaxcomp.ptq`).
  options: Mapping[str, Any] = SolverOptions()  # the solver's options that differ from its defaults.

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
    self._check_formats()
    _check_choice(o, "scale_dtype", self.scale_dtype, SCALE_DTYPES)
    if self.scale_dtype != "float32" and (self.learn_scale or self.w_format != "int"):
      raise SpecError(f"Quant.scale_dtype={self.scale_dtype!r} rounds calibrated integer-grid "
                      "scales; learn_scale and float formats keep float32 (their own) scales")
    self._check_scaling()
    object.__setattr__(self, "options", check_method(o, "quant", self))

  def _check_scaling(self) -> None:
    """Delayed scaling: per-tensor scales of the integer dots from earlier steps' absmax."""
    _check_choice("Quant", "scaling", self.scaling, SCALINGS)
    h = self.amax_history
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
      raise SpecError(f"Quant.amax_history must be a positive int, got {h!r}")
    if self.scaling == "dynamic":
      if h != 16:
        raise SpecError("Quant.amax_history applies to scaling='delayed' only; drop it")
      return
    if not self.int_dot:
      raise SpecError("Quant.scaling='delayed' scales the operands of the integer dots: it "
                      "needs a_bits with symmetric integer weights and activations")
    if self.a_granularity != "tensor":
      raise SpecError("Quant.scaling='delayed' keeps one scale per tensor (a token's scale "
                      "cannot come from earlier steps): set a_granularity='tensor'")
    if self.granularity == "group":
      raise SpecError("Quant.scaling='delayed' needs per-channel or per-tensor weights, "
                      f"not groups (group={self.group})")

  def _check_formats(self) -> None:
    """Float element formats: the bits and group they imply, and the fields they exclude."""
    _check_choice("Quant", "w_format", self.w_format, W_FORMATS)
    _check_choice("Quant", "a_format", self.a_format, A_FORMATS)
    fmt = self.w_format
    if fmt != "int":
      bits = FORMAT_BITS[fmt]
      if self.w_bits not in (8, bits):  # 8 is the field's default: the format sets the width
        raise SpecError(f"Quant.w_format={fmt!r} stores {bits}-bit values; got w_bits={self.w_bits}")
      object.__setattr__(self, "w_bits", bits)
      for name, bad in (("w_symmetric", not self.w_symmetric), ("full_range", self.full_range),
                        ("learn_scale", self.learn_scale),
                        ("calibration", self.calibration != "absmax")):
        if bad:
          raise SpecError(f"Quant.w_format={fmt!r} takes absmax scales on a symmetric grid; "
                          f"drop {name}={getattr(self, name)!r}")
      if fmt in FORMAT_GROUP:
        if self.group not in (None, FORMAT_GROUP[fmt]) or self.granularity == "tensor":
          raise SpecError(f"Quant.w_format={fmt!r} has blocks of {FORMAT_GROUP[fmt]} by "
                          f"definition; got group={self.group!r}, granularity={self.granularity!r}")
        object.__setattr__(self, "group", FORMAT_GROUP[fmt])
        object.__setattr__(self, "granularity", "group")
    if self.a_format != "int":
      if self.a_bits not in (None, 8) or not self.a_symmetric:
        raise SpecError(f"Quant.a_format={self.a_format!r} is an 8-bit symmetric format; got "
                        f"a_bits={self.a_bits!r}, a_symmetric={self.a_symmetric!r}")
      object.__setattr__(self, "a_bits", 8)
    if (fmt != "int" or self.a_format != "int") and self.g_bits is not None:
      raise SpecError("Quant.g_bits (int8 backward dots) needs w_format='int' and a_format='int'")

  @property
  def int_dot(self) -> bool:
    """Whether the forward pass runs a real integer dot (both operands quantized, symmetric)."""
    return (self.a_bits is not None and self.w_symmetric and self.a_symmetric
            and self.w_format == "int" and self.a_format == "int")

  @property
  def fp8_dot(self) -> bool:
    """Whether the forward pass runs a real fp8 dot (weights and activations in one fp8 format)."""
    return self.a_bits is not None and self.w_format in ("e4m3", "e5m2") and (
        self.a_format == self.w_format)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain dict (round-trips through `Quant(**d)`). Fields added after runs
    were first recorded (`LATER_FIELDS`) are left out at their defaults, so a config or a
    stage fingerprint written before they existed stays the same."""
    d = {**dataclasses.asdict(self), "options": dict(self.options)}
    for name, default in LATER_FIELDS.items():
      if d[name] == default:
        del d[name]
    return d

  @classmethod
  def from_dict(cls, d: Any) -> "Quant":
    """Builds a spec from a mapping, rejecting unknown keys by name. A mapping stored by an
    earlier version (``act_order`` / ``damp`` / ``smooth_alpha`` as fields) still loads: those
    become the options of the method they belonged to."""
    return cls(**known_fields(cls, migrate_moved(dict(d), QUANT_MOVED, "rtn")))


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
