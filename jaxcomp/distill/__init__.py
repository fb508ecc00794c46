"""Distillation: losses on arrays (`losses`) and the teacher / student training task."""

from jaxcomp.distill.losses import attention_loss
from jaxcomp.distill.losses import cross_entropy
from jaxcomp.distill.losses import hidden_loss
from jaxcomp.distill.losses import kd_loss
from jaxcomp.distill.losses import logit_kd
from jaxcomp.distill.losses import topk_logit_kd

__all__ = [
    "attention_loss",
    "cross_entropy",
    "hidden_loss",
    "kd_loss",
    "logit_kd",
    "topk_logit_kd",
]
