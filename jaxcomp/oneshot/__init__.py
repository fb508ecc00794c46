"""One-shot compression over the sequential calibration pipeline: `ptq`, `prune`, `factorize`,
their solvers chosen by name from `jaxcomp.oneshot.registry`."""

from jaxcomp.oneshot.api import factorize
from jaxcomp.oneshot.api import prune
from jaxcomp.oneshot.api import ptq
from jaxcomp.oneshot.api import ptq_skeleton
from jaxcomp.oneshot.calibrate import Capture
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.calibrate import calib_tokens
from jaxcomp.oneshot.pipeline import LayerResult
from jaxcomp.oneshot.scoring import Sensitivity
from jaxcomp.oneshot.scoring import owl_recipe
from jaxcomp.oneshot.scoring import sensitivity
from jaxcomp.oneshot.solver import QuantSolution
from jaxcomp.oneshot.solver import Solver

__all__ = ["Capture", "LayerResult", "LayerStats", "QuantSolution", "Sensitivity", "Solver",
           "calib_tokens", "factorize", "owl_recipe", "prune", "ptq", "ptq_skeleton", "sensitivity"]
