"""What every generation backend takes and returns, so the trainer cannot tell them apart, and the
rollouts the rollout side hands to the actor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:  # annotations only: the types stay importable without torch
    import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    # the embedded engine draws this call's samples from this seed (same seed and weights, same
    # samples, so a resumed run generates what the uninterrupted one did); None: its own stream
    seed: Optional[int] = None


@dataclass
class Sample:
    prompt_index: int  # which prompt of the batch
    sample_index: int  # 0..n-1 among that prompt's samples
    output_ids: list[int]  # generated tokens (the stop token included when generation stopped)
    logprobs: Optional[list[float]]  # the engine's log-prob of each generated token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    weight_version: int = 0
    extra: dict = field(default_factory=dict)
    # MoE models: the experts each fed token was routed to, [prompt + response - 1, MoE layers, top_k]
    # (rollout/routing.py); None for a dense model
    routed_experts: Optional[torch.Tensor] = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Rollout:
    """One sampled response with its label, as the rollout side hands it to the actor."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float  # the verifier's label, 0/1
    group: int  # prompt group, 0..num_groups-1 within the rollout batch
    engine_logprobs: Optional[list[float]] = None  # the sampler's, one per response token
    truncated: bool = False
    in_loss: bool = True  # False: out of the loss and out of its group (algorithm.truncated=exclude)
    penalty: float = 0.0  # added to the reward of reward-weighted baselines (DAPO's overlong penalty)
    weight_version: int = 0  # the weights it was sampled with (the oldest, if they changed mid-sample)
    source: str = ""  # its prompt's file:row
    # MoE models: the engine's experts per fed token, [prompt + response - 1, MoE layers, top_k]
    # (rollout/routing.py), replayed by the actor (actor/routing_replay.py)
    routed_experts: Optional[torch.Tensor] = None
    # multi-turn (real_megatron/agents/): True where the model sampled the response token (its turns),
    # False between turns (tool results, environment turns, template glue); None: every token is the model's
    response_mask: Optional[list[bool]] = None
    turns: Optional[list[dict]] = None  # the conversation's messages with their roles (rollouts.jsonl)
    stats: dict = field(default_factory=dict)  # per-trajectory counts (model turns, tool calls, ...)

    @property
    def num_model_tokens(self) -> int:
        """Response tokens the model sampled (those in the loss)."""
        return len(self.response_ids) if self.response_mask is None else sum(self.response_mask)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def informative_groups(rollouts: list[Rollout]) -> set[int]:
    """Groups whose rollouts in the loss differ in reward (both labels, for 0/1 rewards; a uniform
    group gives no signal to any objective)."""
    rewards: dict[int, set] = {}
    for r in rollouts:
        if r.in_loss:
            rewards.setdefault(r.group, set()).add(r.reward)
    return {g for g, seen in rewards.items() if len(seen) >= 2}


class Engine(Protocol):
    """What the loop, the rollout source and the evaluation see of a generation engine; the
    embedded engine (local.py) and the SGLang fleet (sglang_fleet.py) implement it, and trainer
    ranks other than 0, which generate nothing, hold a `PeerEngine` (weight_sync.py). How weights
    travel (in memory, disk, broadcast) is chosen when the engine is built, never by the loop."""

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """n samples for each prompt (token ids in and out), grouped per prompt."""

    def load_weights(self, actor, version: int) -> None:
        """The actor's current weights, as `version`; a collective: every trainer rank calls it."""

    @property
    def weight_version(self) -> int:
        """The version of the weights every later sample is drawn with."""

    def close(self) -> None:
        """Release what the engine holds (servers this process launched, the weight group)."""
