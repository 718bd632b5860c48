"""The objective's settings: the `algorithm` section of a run's config, its defaults and its own
checks, and the objectives' names (defined here once: the registry builds from them, the config
accepts them). Checks that involve other sections (rollout.n_samples, rollout.use_engine_logprobs,
...) are config.py's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

REAL_VARIANTS = {"real": "real", "real_no_anchor": "no_anchor", "real_bce": "bce"}  # name -> real_loss variant
CLIP_RANGES = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}  # published (clip_low, clip_high)
OBJECTIVES = (*REAL_VARIANTS, *CLIP_RANGES)
REAL_OBJECTIVES = tuple(REAL_VARIANTS)  # rewards as labels; the others weigh advantages
KL_TARGETS = ("none", "reference", "old")
IMPORTANCE_CORRECTIONS = ("none", "tis", "mis")


@dataclass
class AlgorithmConfig:
    name: Literal[OBJECTIVES] = "real"
    tau: float = 0.5  # REAL temperature
    skip_uniform_groups: bool = True  # groups whose rewards are all equal give no loss
    clip_low: Optional[float] = None  # baselines; None = the algorithm's published default
    clip_high: Optional[float] = None
    # KL to the run's initial model (frozen, one extra forward per rollout batch) or to pi_old
    kl: Literal[KL_TARGETS] = "none"
    kl_coef: float = 0.0
    updates_per_batch: int = 1  # passes over each rollout batch
    # REAL-BCE's divisor: "rollouts" = the rollouts of the groups in the loss (the paper's released
    # code: BCE with reduction='mean' over informative groups), "prompts" = like REAL
    bce_normalise: Literal["rollouts", "prompts"] = "rollouts"
    # DAPO's dynamic sampling: groups whose labels are all equal are set aside and more prompts are
    # generated, rounds of train.prompts_per_step prompts, until the batch holds
    # train.prompts_per_step informative groups or max_sampling_rounds rounds have run
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # responses cut at rollout.max_new_tokens: keep (as verified), negative (label 0), or exclude
    # (out of the loss and out of their group)
    truncated: Literal["keep", "negative", "exclude"] = "keep"
    # DAPO's soft overlong penalty for reward-weighted baselines (0 = off): a response within the
    # last overlong_buffer_tokens of rollout.max_new_tokens loses up to overlong_penalty reward
    overlong_buffer_tokens: int = 0
    overlong_penalty: float = 1.0
    # train-inference mismatch: importance weights from pi_old / pi_engine, capped at is_cap
    # (tis: min(r, C); mis: r inside [1/C, C], else out of the loss); for REAL a per-rollout
    # weight on its group terms (beyond the paper)
    importance_correction: Literal[IMPORTANCE_CORRECTIONS] = "none"
    is_cap: float = 2.0
    # REAL's objectives: one weight per rollout from its length-normalised ratio (sequence), or one
    # per token inside s̄ (token: corrects rollouts generated ahead, rollout.max_staleness >= 1, where
    # the sampler lags pi_old by whole updates); GRPO/DAPO weigh tokens, GSPO sequences, always
    importance_unit: Literal["sequence", "token"] = "sequence"
    mismatch_threshold: float = 0.5  # |log pi_old - log pi_engine| above this counts in mismatch_frac

    @property
    def is_real(self) -> bool:
        return self.name in REAL_OBJECTIVES

    def clip_range(self) -> tuple[float, float]:
        """(clip_low, clip_high) of a clipped baseline: the section's, else the published ones."""
        low, high = CLIP_RANGES[self.name]
        return (low if self.clip_low is None else self.clip_low, high if self.clip_high is None else self.clip_high)

    def check(self) -> list[str]:
        """What is wrong inside this section alone (each a sentence naming the key); [] if nothing.
        (Counts that must be positive are config.py's first pass, before anything divides by them.)"""
        errors = []
        if self.name not in OBJECTIVES:
            errors.append(f"unknown objective {self.name!r}; registered: {', '.join(OBJECTIVES)}")
        if self.importance_unit != "sequence" and not self.is_real:
            errors.append(f"algorithm.importance_unit applies to REAL's objectives; {self.name} has its own unit")
        if self.is_cap <= 1:
            errors.append(f"algorithm.is_cap must be > 1, got {self.is_cap}")
        if self.kl != "none" and self.kl_coef <= 0:
            errors.append(f"algorithm.kl={self.kl!r} needs algorithm.kl_coef > 0")
        if self.kl == "none" and self.kl_coef > 0:
            errors.append(
                f"algorithm.kl_coef={self.kl_coef} has no effect with algorithm.kl='none'; choose 'reference' or 'old'"
            )
        return errors
