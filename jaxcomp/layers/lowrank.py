"""NNX layers put in place by the low-rank rewrites: a factored linear layer and LoRA adapters.

Both keep the logical sharding names of the kernel they come from: a factor ``a (K, r)`` takes
the kernel's input name and ``b (r, N)`` its output name; the rank axis is replicated.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["LoRALinear", "LowRankLinear"]


def _names(kernel: nnx.Variable) -> tuple[Any, Any]:
  names = kernel.get_metadata().get("out_sharding")
  return (None, None) if names is None else (names[0], names[-1])


def _param(cls: type, value: Array, names: tuple[Any, ...],
           like: nnx.Variable | None = None) -> nnx.Variable:
  """A new variable with logical ``names``; placed by them on the mesh of ``like`` (the layer's
  kernel) when that kernel is placed on one."""
  meta = {} if all(n is None for n in names) else {"out_sharding": names}
  var = cls(value, eager_sharding=False, **meta)
  sharding = None if like is None else getattr(like[...], "sharding", None)
  if meta and isinstance(sharding, jax.sharding.NamedSharding):
    spec = nnx.spmd.get_var_pspec(var)  # the logical rules in force applied
    var = var.replace(jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec)))
  return var


class LowRankLinear(nnx.Module):
  """``y = (x @ a) @ b + bias``: a linear layer factored through rank ``r``.

  Shapes: ``x [..., K] -> [..., N]``, ``a (K, r)``, ``b (r, N)``, ``bias (N,)``.

  Example:
    >>> lin = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    >>> lr = LowRankLinear.from_linear(lin, jnp.ones((8, 2)), jnp.ones((2, 6)))
    >>> lr(jnp.ones((3, 8))).shape
    (3, 6)
  """

  def __init__(self, a: nnx.Variable, b: nnx.Variable, bias: nnx.Variable | None,
               dtype: Any = None):
    self.a, self.b, self.bias, self.dtype = a, b, bias, dtype

  @classmethod
  def from_linear(cls, lin: nnx.Linear, a: Array, b: Array) -> LowRankLinear:
    """Factors of ``lin``'s kernel (its bias, dtypes and sharding names kept)."""
    k_name, n_name = _names(lin.kernel)
    names = lin.kernel.get_metadata().get("out_sharding")
    lead = tuple(names[:-2]) if names is not None else (None,) * (jnp.ndim(a) - 2)
    dt = lin.kernel[...].dtype
    bias = None if lin.bias is None else lin.bias
    return cls(_param(nnx.Param, jnp.asarray(a, dt), (*lead, k_name, None), lin.kernel),
               _param(nnx.Param, jnp.asarray(b, dt), (*lead, None, n_name), lin.kernel), bias,
               lin.dtype)

  @property
  def rank(self) -> int:
    return self.a[...].shape[-1]

  def __call__(self, x: Array) -> Array:
    dtype = self.dtype or jnp.result_type(x, self.a[...])
    y = (x.astype(dtype) @ self.a[...].astype(dtype)) @ self.b[...].astype(dtype)
    return y if self.bias is None else y + self.bias[...].astype(dtype)


class LoRALinear(nnx.Module):
  """``y = base(x) + (alpha / r) * (x @ lora_a) @ lora_b`` (Hu et al. 2021, LoRA).

  ``base`` is the original layer, left as it is (float, or quantized for QLoRA); ``lora_a`` /
  ``lora_b`` are `nnx.LoRAParam`, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains the
  adapters only. ``lora_b`` starts at zero: a fresh adapter leaves the output unchanged.

  Example:
    >>> lin = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    >>> lora = LoRALinear(lin, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    >>> bool(jnp.all(lora(jnp.ones((1, 8))) == lin(jnp.ones((1, 8)))))
    True
  """

  def __init__(self, base: nnx.Module, *, rank: int, alpha: float, rngs: nnx.Rngs):
    kernel = base.kernel
    *stack, k, n = kernel[...].shape  # a stack of L layers (nnx.vmap) gets L adapters
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(k, n):
      raise ValueError(f"LoRA rank must be an int in [1, min(in, out) = {min(k, n)}], got {rank!r}")
    names = kernel.get_metadata().get("out_sharding")
    lead = tuple(names[:-2]) if names is not None else (None,) * len(stack)
    k_name, n_name = _names(kernel)
    init = nnx.initializers.he_uniform(batch_axis=tuple(range(len(stack))))
    self.base = base
    self.lora_a = _param(nnx.LoRAParam, init(rngs.params(), (*stack, k, rank), jnp.float32),
                         (*lead, k_name, None), kernel)
    self.lora_b = _param(nnx.LoRAParam, jnp.zeros((*stack, rank, n), jnp.float32),
                         (*lead, None, n_name), kernel)
    self.scale = float(alpha) / rank

  def delta(self) -> Array:
    """The kernel update ``(alpha / r) a @ b``, ``(K, N)`` float32 (``(L, K, N)`` for a stack)."""
    return self.scale * (self.lora_a[...] @ self.lora_b[...])

  def __call__(self, x: Array) -> Array:
    y = self.base(x)
    lora = (x.astype(jnp.float32) @ self.lora_a[...]) @ self.lora_b[...]
    return y + (self.scale * lora).astype(y.dtype)
