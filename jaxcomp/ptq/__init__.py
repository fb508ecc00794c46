"""Post-training quantization and one-shot pruning and factorization: solvers on arrays (``*_core.py``) and `ptq` over NNX models."""

from jaxcomp.ptq.api import LayerResult
from jaxcomp.ptq.api import ptq
from jaxcomp.ptq.api import solve_layer
from jaxcomp.ptq.awq_core import awq
from jaxcomp.ptq.awq_core import awq_clip
from jaxcomp.ptq.awq_core import awq_scales
from jaxcomp.ptq.calibrate import Capture
from jaxcomp.ptq.calibrate import LayerStats
from jaxcomp.ptq.calibrate import calib_tokens
from jaxcomp.ptq.factorize import factor_kernel
from jaxcomp.ptq.factorize import factorize
from jaxcomp.ptq.gptq_core import GPTQResult
from jaxcomp.ptq.gptq_core import gptq
from jaxcomp.ptq.gptq_core import hessian
from jaxcomp.ptq.gptq_core import output_error
from jaxcomp.ptq.gptq_core import rtn
from jaxcomp.ptq.gptq_core import weight_step
from jaxcomp.ptq.prune import prune
from jaxcomp.ptq.prune import prune_kernel
from jaxcomp.ptq.smoothquant_core import smooth
from jaxcomp.ptq.smoothquant_core import smooth_scales
from jaxcomp.ptq.sparsegpt_core import SparseGPTResult
from jaxcomp.ptq.sparsegpt_core import sparsegpt

__all__ = [
    "Capture",
    "GPTQResult",
    "LayerResult",
    "LayerStats",
    "SparseGPTResult",
    "awq",
    "awq_clip",
    "awq_scales",
    "calib_tokens",
    "factor_kernel",
    "factorize",
    "gptq",
    "hessian",
    "output_error",
    "prune",
    "prune_kernel",
    "ptq",
    "rtn",
    "smooth",
    "smooth_scales",
    "solve_layer",
    "sparsegpt",
    "weight_step",
]
