"""RTN: round to nearest, no data. The layer is quantized exactly as `jaxcomp.quantize` (QAT)
would quantize it, its scales calibrated from the weights at run time, so every layer type the
QAT rewrite handles is supported."""

from flax import nnx

from jaxcomp.oneshot.solver import Solver

SOLVER = Solver("rtn", "quant", calibrated=False,
                layers=(nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed),
                solve=None)
