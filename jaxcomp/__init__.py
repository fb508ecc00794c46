"""jaxcomp: model compression for JAX/Flax as pure module rewrites.

Public API, one name a line. Numerics (``jaxcomp.quant``) work on plain arrays without Flax.
No subpackage shares a name with a public function (``jaxcomp.ptq`` is the function; the
solvers live in ``jaxcomp.quantizers``, the pipeline in ``jaxcomp.oneshot``).
"""

from jaxcomp.layers import AmaxHistory
from jaxcomp.layers import QuantScale
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot import factorize
from jaxcomp.oneshot import Sensitivity
from jaxcomp.oneshot import owl_recipe
from jaxcomp.oneshot import prune
from jaxcomp.oneshot import ptq
from jaxcomp.oneshot import sensitivity
from jaxcomp.quant.core import compute_scale
from jaxcomp.quant.core import dequantize
from jaxcomp.quant.core import fake_quant
from jaxcomp.quant.core import lsq_fake_quant
from jaxcomp.quant.core import quantize_per_token
from jaxcomp.quant.core import quantize as quantize_array
from jaxcomp.quant.dot import quant_dot_general
from jaxcomp.quant.spec import Quant
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import SpecError
from jaxcomp.recipe import MatchReport
from jaxcomp.recipe import Recipe
from jaxcomp.recipe import RecipeError
from jaxcomp.recipe import Rule
from jaxcomp.rewrite import add_lora
from jaxcomp.rewrite import amax_overwrite
from jaxcomp.rewrite import calibrate_amax
from jaxcomp.rewrite import merge_lora
from jaxcomp.rewrite import quantize
from jaxcomp.rewrite import report
from jaxcomp.serve import convert
from jaxcomp.serve import packed_skeleton
from jaxcomp.serve import restore_packed
from jaxcomp.serve import save_packed
from jaxcomp.sparse.spec import Sparsity

__all__ = [
    "AmaxHistory",
    "LowRank",
    "MatchReport",
    "QArray",
    "Quant",
    "QuantScale",
    "Recipe",
    "RecipeError",
    "Rule",
    "Sensitivity",
    "Sparsity",
    "SpecError",
    "add_lora",
    "amax_overwrite",
    "calibrate_amax",
    "compute_scale",
    "convert",
    "dequantize",
    "factorize",
    "fake_quant",
    "lsq_fake_quant",
    "merge_lora",
    "owl_recipe",
    "packed_skeleton",
    "prune",
    "ptq",
    "quant_dot_general",
    "quantize",
    "quantize_array",
    "quantize_per_token",
    "report",
    "restore_packed",
    "save_packed",
    "sensitivity",
]
