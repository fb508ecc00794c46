"""Post-training quantization: solvers on arrays (``*_core.py``); model plumbing with #4."""

from jaxcomp.ptq.gptq_core import gptq
from jaxcomp.ptq.gptq_core import hessian
from jaxcomp.ptq.gptq_core import output_error
from jaxcomp.ptq.gptq_core import rtn

__all__ = [
    "gptq",
    "hessian",
    "output_error",
    "rtn",
]
