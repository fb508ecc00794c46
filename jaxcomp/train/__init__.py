"""One training loop: `train(config, workdir)`, its state, checkpoints, metrics and shardings."""

from jaxcomp.train.checkpoint import CheckpointError
from jaxcomp.train.loop import TrainingDiverged
from jaxcomp.train.loop import TrainState
from jaxcomp.train.loop import make_optimizer
from jaxcomp.train.loop import train

__all__ = [
    "CheckpointError",
    "TrainState",
    "TrainingDiverged",
    "make_optimizer",
    "train",
]
