"""Objectives by name, behind one interface the trainer calls per micro-batch.

An objective maps a `PolicyBatch` (packed 1-D tokens of one micro-batch on one rank) to loss
*terms keyed by their unit*: "groups", "sequences", "tokens" or "informative_sequences" (rollouts
of groups with both labels). Each term is a sum; the trainer divides it by the count of that unit
in the whole mini-batch (over all micro-batches and DP ranks), which makes the gradient
independent of how the mini-batch was split. Rollouts out of the loss (`active` false: excluded
truncated responses) are out of every count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .distributed import real_loss_across_ranks
from .importance import sequence_importance_weights, token_importance_weights
from .kl import sequence_kl
from .policy_gradient import group_advantages, sequence_clip_loss, token_clip_loss
from .real import real_loss, sequence_scores
from .settings import OBJECTIVES, REAL_VARIANTS, AlgorithmConfig

Unit = Literal["groups", "sequences", "tokens", "informative_sequences"]


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
    engine_logprobs: Optional[torch.Tensor] = None  # [T] log pi_engine (the sampler's), for importance correction
    active: Optional[torch.Tensor] = None  # [N] bool: in the loss and in its group (None: all)

    @property
    def num_sequences(self) -> int:
        return self.rewards.numel()

    def in_loss(self) -> PolicyBatch:
        """This batch with the tokens of inactive rollouts out of loss_mask."""
        if self.active is None:
            return self
        return dataclasses.replace(self, loss_mask=self.loss_mask.bool() & self.active[self.seq_index])


class Objective:
    """An objective reads its settings from the `algorithm` section it is given (settings.py),
    checked there once."""

    def __init__(self, settings: AlgorithmConfig):
        self.algorithm = settings  # the `algorithm` section itself

    @property
    def name(self) -> str:
        return self.algorithm.name

    @property
    def kl(self) -> str:
        return self.algorithm.kl

    @property
    def importance_correction(self) -> str:
        return self.algorithm.importance_correction

    def __call__(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        batch = batch.in_loss()
        terms = self.policy_terms(batch, dp_group)
        for unit, value in self.kl_terms(batch).items():
            terms[unit] = terms.get(unit, 0.0) + value
        return terms

    def kl_terms(self, batch: PolicyBatch) -> dict[Unit, torch.Tensor]:
        """kl_coef x the token-mean k3 KL per sequence to pi_ref or pi_old, summed ({} without KL)."""
        if self.kl == "none" or self.algorithm.kl_coef <= 0:
            return {}
        target = batch.old_logprobs if self.kl == "old" else batch.ref_logprobs
        if target is None:
            raise ValueError("kl='reference' needs PolicyBatch.ref_logprobs (log-probs of the reference model)")
        kl = sequence_kl(batch.logprobs, target, batch.loss_mask, batch.seq_index, batch.num_sequences)
        return {"sequences": self.algorithm.kl_coef * kl.sum()}

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        raise NotImplementedError

    def _engine_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        if batch.engine_logprobs is None:
            raise ValueError(
                f"algorithm.importance_correction={self.importance_correction} needs the engine's "
                "log-probs of every response token; the rollouts carry none"
            )
        return batch.engine_logprobs

    def token_weights(self, batch: PolicyBatch) -> Optional[torch.Tensor]:
        """[T] importance weights (None without correction)."""
        if self.importance_correction == "none":
            return None
        return token_importance_weights(
            batch.old_logprobs, self._engine_logprobs(batch), mode=self.importance_correction, cap=self.algorithm.is_cap
        )

    def sequence_weights(self, batch: PolicyBatch) -> Optional[torch.Tensor]:
        """[N] importance weights of the length-normalised ratio (None without correction)."""
        if self.importance_correction == "none":
            return None
        return sequence_importance_weights(
            batch.old_logprobs,
            self._engine_logprobs(batch),
            batch.loss_mask,
            batch.seq_index,
            batch.num_sequences,
            mode=self.importance_correction,
            cap=self.algorithm.is_cap,
        )


class RealObjective(Objective):
    """REAL and its variants. bce_normalise: "rollouts" divides REAL-BCE by the rollouts of the
    groups in the loss (informative ones with skip_uniform_groups), as the paper's released code
    does (binary cross-entropy, reduction='mean'); "prompts" divides by prompts, like REAL."""

    def __init__(self, settings: AlgorithmConfig):
        super().__init__(settings)
        self.variant = REAL_VARIANTS[settings.name]

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        logprobs, weights = batch.logprobs, None  # importance weights: an extension beyond the paper
        if self.algorithm.importance_unit == "token" and self.importance_correction != "none":
            # each token's term of s̄ weighted by its capped pi_old / pi_engine: s̄ = mean_t w_t (log pi - log pi_old),
            # 0 at the first update as before; its gradient is the off-policy-corrected one per token
            logprobs = batch.old_logprobs + self.token_weights(batch) * (batch.logprobs - batch.old_logprobs)
        else:
            weights = self.sequence_weights(batch)
        scores = sequence_scores(logprobs, batch.old_logprobs, batch.loss_mask, batch.seq_index, batch.num_sequences)
        if batch.active is not None:
            active = batch.active.to(scores.dtype)
            weights = active if weights is None else weights * active
        options = dict(
            tau=self.algorithm.tau,
            variant=self.variant,
            skip_uniform_groups=self.algorithm.skip_uniform_groups,
            weights=weights,
        )
        if batch.num_groups is None:
            loss = real_loss(scores, batch.rewards, batch.group_ids, **options)
        else:
            loss = real_loss_across_ranks(
                scores, batch.rewards, batch.group_ids, batch.num_groups, dp_group=dp_group, **options
            )
        return {self.unit: loss}

    @property
    def unit(self) -> Unit:
        if self.variant != "bce" or self.algorithm.bce_normalise == "prompts":
            return "groups"
        return "informative_sequences" if self.algorithm.skip_uniform_groups else "sequences"


class ClipObjective(Objective):
    """GRPO / DAPO (token ratio) and GSPO (sequence ratio)."""

    def __init__(self, settings: AlgorithmConfig):
        super().__init__(settings)
        self.kind = settings.name
        self.clip_low, self.clip_high = settings.clip_range()

    def policy_terms(self, batch: PolicyBatch, dp_group=None) -> dict[Unit, torch.Tensor]:
        adv = batch.advantages if batch.advantages is not None else group_advantages(batch.rewards, batch.group_ids)
        adv = adv.detach().to(batch.logprobs.dtype)
        args = (batch.logprobs, batch.old_logprobs, adv, batch.loss_mask, batch.seq_index, batch.num_sequences)
        clip = dict(clip_low=self.clip_low, clip_high=self.clip_high)
        if self.kind == "gspo":  # a sequence ratio: sequence weights
            return {"sequences": sequence_clip_loss(*args, **clip, weights=self.sequence_weights(batch))}
        weights = self.token_weights(batch)
        if self.kind == "dapo":
            return {"tokens": token_clip_loss(*args, **clip, reduce="token_sum", weights=weights)}
        return {"sequences": token_clip_loss(*args, **clip, reduce="sequence_mean", weights=weights)}


def objective_from_config(algorithm: AlgorithmConfig) -> Objective:
    """The objective of an `algorithm` section, which it keeps (not a copy of its fields)."""
    errors = algorithm.check()
    if errors:
        raise ValueError("; ".join(errors))
    return (RealObjective if algorithm.name in REAL_VARIANTS else ClipObjective)(algorithm)


def build_objective(name: str, **options) -> Objective:
    """The objective registered as `name` (one of OBJECTIVES) with `algorithm` options (tau, kl,
    kl_coef, ...) over the section's defaults; a shorthand for tests and tools."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
    return objective_from_config(AlgorithmConfig(name=name, **options))


def normalise(terms: dict[Unit, torch.Tensor], counts: dict[Unit, float]) -> torch.Tensor:
    """Combine summed terms into the mini-batch loss: sum_k terms[k] / counts[k] (global counts).
    A unit counted 0 times (no informative group, every rollout excluded) adds 0, not 0/0."""
    total: torch.Tensor | float = 0.0
    for unit, value in terms.items():
        if unit not in counts or counts[unit] < 0:
            raise ValueError(
                f"loss term in {unit!r} needs the count of {unit} in the mini-batch, got {counts.get(unit)}"
            )
        total = total + (value / counts[unit] if counts[unit] > 0 else value * 0.0)
    return total  # type: ignore[return-value]
