"""What every generation backend takes and returns, so the trainer cannot tell them apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

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


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """n samples for each prompt (token ids in and out), grouped per prompt."""

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights with HF-named tensors; later samples carry `version`."""
