"""Policy objectives: REAL and its variants, and the GRPO/DAPO/GSPO baselines, by name."""

from .distributed import real_loss_across_ranks
from .kl import k3_kl, sequence_kl
from .policy_gradient import group_advantages
from .real import real_loss, sequence_scores
from .registry import OBJECTIVES, Objective, PolicyBatch, build_objective, normalise, objective_from_config

__all__ = [
    "OBJECTIVES",
    "Objective",
    "PolicyBatch",
    "build_objective",
    "group_advantages",
    "k3_kl",
    "normalise",
    "objective_from_config",
    "real_loss",
    "real_loss_across_ranks",
    "sequence_kl",
    "sequence_scores",
]
