"""Objectives by name, behind one interface the trainer calls per micro-batch.

An objective maps a `PolicyBatch` (packed 1-D tokens of one micro-batch on one rank) to loss
*terms keyed by their unit*: "groups", "sequences" or "tokens". Each term is a sum; the trainer
divides it by the count of that unit in the whole mini-batch (over all micro-batches and DP
ranks), which makes the gradient independent of how the mini-batch was split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .distributed import real_loss_across_ranks
from .kl import sequence_kl
from .policy_gradient import group_advantages, sequence_clip_loss, token_clip_loss
from .real import real_loss, sequence_scores

Unit = Literal["groups", "sequences", "tokens"]


@dataclass
class PolicyBatch:
    logprobs: torch.Tensor  # [T] log pi_theta of each token (differentiable)
    old_logprobs: torch.Tensor  # [T] log pi_old
    loss_mask: torch.Tensor  # [T] 1 on response tokens
    seq_index: torch.Tensor  # [T] sequence of each token, 0..N-1
    rewards: torch.Tensor  # [N] 0/1
    group_ids: torch.Tensor  # [N] prompt group of each sequence
    ref_logprobs: Optional[torch.Tensor] = None  # [T] log pi_ref, for kl="reference"
    advantages: Optional[torch.Tensor] = None  # [N]; computed from rewards within the batch if None
    # Set when a group's rollouts may sit on several data-parallel ranks: group_ids are then
    # group numbers in [0, num_groups), the same on every rank, and REAL reduces over dp_group.
    num_groups: Optional[int] = None

    @property
    def num_sequences(self) -> int:
        return self.rewards.numel()


class Objective:
    name: str

    def __init__(self, *, kl: str = "none", kl_coef: float = 0.0):
        if kl not in ("none", "reference", "old"):
            raise ValueError(f"kl must be 'none', 'reference' or 'old', got {kl!r}")
        self.kl, self.kl_coef = kl, kl_coef

    def __call__(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        terms = self.policy_terms(batch, dp_group)
        if self.kl != "none" and self.kl_coef > 0:
            target = batch.old_logprobs if self.kl == "old" else batch.ref_logprobs
            if target is None:
                raise ValueError("kl='reference' needs PolicyBatch.ref_logprobs (log-probs of the reference model)")
            kl = sequence_kl(batch.logprobs, target, batch.loss_mask, batch.seq_index, batch.num_sequences)
            terms["sequences"] = terms.get("sequences", 0.0) + self.kl_coef * kl.sum()
        return terms

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        raise NotImplementedError


class RealObjective(Objective):
    def __init__(self, variant: str, *, tau: float = 0.5, skip_uniform_groups: bool = True, **kl):
        super().__init__(**kl)
        self.variant, self.tau, self.skip_uniform_groups = variant, tau, skip_uniform_groups

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        scores = sequence_scores(batch.logprobs, batch.old_logprobs, batch.loss_mask, batch.seq_index, batch.num_sequences)
        options = dict(tau=self.tau, variant=self.variant, skip_uniform_groups=self.skip_uniform_groups)
        if batch.num_groups is None:
            loss = real_loss(scores, batch.rewards, batch.group_ids, **options)
        else:
            loss = real_loss_across_ranks(
                scores, batch.rewards, batch.group_ids, batch.num_groups, dp_group=dp_group, **options
            )
        return {"groups": loss}


class ClipObjective(Objective):
    """GRPO / DAPO (token ratio) and GSPO (sequence ratio)."""

    def __init__(self, kind: str, *, clip_low: float, clip_high: float, **kl):
        super().__init__(**kl)
        self.kind, self.clip_low, self.clip_high = kind, clip_low, clip_high

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        adv = batch.advantages if batch.advantages is not None else group_advantages(batch.rewards, batch.group_ids)
        adv = adv.detach().to(batch.logprobs.dtype)
        args = (batch.logprobs, batch.old_logprobs, adv, batch.loss_mask, batch.seq_index, batch.num_sequences)
        clip = dict(clip_low=self.clip_low, clip_high=self.clip_high)
        if self.kind == "gspo":
            return {"sequences": sequence_clip_loss(*args, **clip)}
        if self.kind == "dapo":
            return {"tokens": token_clip_loss(*args, **clip, reduce="token_sum")}
        return {"sequences": token_clip_loss(*args, **clip, reduce="sequence_mean")}


# name -> (factory, published defaults for the clip range)
_CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}
_REAL_VARIANTS = {"real": "real", "real_no_anchor": "no_anchor", "real_bce": "bce"}
OBJECTIVES = tuple(_REAL_VARIANTS) + tuple(_CLIP_DEFAULTS)


def build_objective(
    name: str,
    *,
    tau: float = 0.5,
    skip_uniform_groups: bool = True,
    clip_low: float | None = None,
    clip_high: float | None = None,
    kl: str = "none",
    kl_coef: float = 0.0,
) -> Objective:
    """The objective registered as `name` (one of OBJECTIVES), with the given hyper-parameters."""
    kl_args = dict(kl=kl, kl_coef=kl_coef)
    if name in _REAL_VARIANTS:
        obj: Objective = RealObjective(_REAL_VARIANTS[name], tau=tau, skip_uniform_groups=skip_uniform_groups, **kl_args)
    elif name in _CLIP_DEFAULTS:
        low, high = _CLIP_DEFAULTS[name]
        obj = ClipObjective(
            name,
            clip_low=low if clip_low is None else clip_low,
            clip_high=high if clip_high is None else clip_high,
            **kl_args,
        )
    else:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
    obj.name = name
    return obj


def objective_from_config(algorithm) -> Objective:
    """Build from an `AlgorithmConfig` section."""
    return build_objective(
        algorithm.name, tau=algorithm.tau, skip_uniform_groups=algorithm.skip_uniform_groups,
        clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, kl=algorithm.kl, kl_coef=algorithm.kl_coef,
    )


def normalise(terms: dict[Unit, torch.Tensor], counts: dict[Unit, float]) -> torch.Tensor:
    """Combine summed terms into the mini-batch loss: sum_k terms[k] / counts[k] (global counts)."""
    total: torch.Tensor | float = 0.0
    for unit, value in terms.items():
        if counts.get(unit, 0) <= 0:
            raise ValueError(f"loss term in {unit!r} needs a positive count of {unit} in the mini-batch, got {counts.get(unit)}")
        total = total + value / counts[unit]
    return total  # type: ignore[return-value]


