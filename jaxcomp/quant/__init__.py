"""Quantization numerics on plain arrays (no Flax): for jaxcomp's layers and any JAX codebase."""

from jaxcomp.quant.core import compute_scale
from jaxcomp.quant.core import dequantize
from jaxcomp.quant.core import fake_quant
from jaxcomp.quant.core import fake_quant_with_scale
from jaxcomp.quant.core import grad_scale
from jaxcomp.quant.core import lsq_fake_quant
from jaxcomp.quant.core import lsq_init
from jaxcomp.quant.core import qrange
from jaxcomp.quant.core import quantize
from jaxcomp.quant.core import quantize_per_token
from jaxcomp.quant.core import round_ste
from jaxcomp.quant.dot import fake_quant_weight
from jaxcomp.quant.dot import fp8_dot
from jaxcomp.quant.dot import int_dot
from jaxcomp.quant.dot import quant_conv_general_dilated
from jaxcomp.quant.dot import quant_dot_general
from jaxcomp.quant.dot import weight_scale_shape
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.qarray import pack_bits
from jaxcomp.quant.qarray import pack_int4
from jaxcomp.quant.qarray import quantize_weight
from jaxcomp.quant.qarray import unpack_bits
from jaxcomp.quant.qarray import unpack_int4
from jaxcomp.quant.spec import Quant
from jaxcomp.quant.spec import SpecError

__all__ = [
    "QArray",
    "Quant",
    "SpecError",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "fake_quant_weight",
    "fake_quant_with_scale",
    "grad_scale",
    "fp8_dot",
    "int_dot",
    "lsq_fake_quant",
    "lsq_init",
    "pack_bits",
    "pack_int4",
    "qrange",
    "quant_conv_general_dilated",
    "quant_dot_general",
    "quantize",
    "quantize_per_token",
    "quantize_weight",
    "round_ste",
    "unpack_bits",
    "unpack_int4",
    "weight_scale_shape",
]
