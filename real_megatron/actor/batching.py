"""Rollouts -> group-aligned, token-balanced micro-batches for every data-parallel rank.

A rollout batch holds G rollouts for each of P prompt groups. It is cut into mini-batches of whole
groups (one optimizer step each), each mini-batch into M micro-batch indices of whole groups, and
each micro-batch's rollouts are spread over the DP ranks. A group never straddles two micro-batch
indices (its rollouts may sit on several ranks), so REAL's group log-sum-exp for micro-batch k is
exact with one collective. Groups go to micro-batches, and rollouts to ranks, longest first onto
the least-loaded (in tokens) place, so ranks do similar work. Every rank computes the same plan.

Tensors per (micro-batch, rank) are right-padded rows [b, s] with a causal mask; the loss reads
the logits at the positions that predict response tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int  # prompt group, 0..num_groups-1 within the rollout batch
    engine_logprobs: Optional[list[float]] = None
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """One rank's share of one micro-batch index."""

    rollout_ids: list[int]
    tokens: torch.Tensor  # [b, s]
    position_ids: torch.Tensor  # [b, s]
    rows: torch.Tensor  # [N] row of each response token's predicting position
    cols: torch.Tensor  # [N] its column
    targets: torch.Tensor  # [N] the response token ids
    seq_index: torch.Tensor  # [N] local sequence (row) of each response token
    rewards: torch.Tensor  # [b]
    group_index: torch.Tensor  # [b] group numbered within this micro-batch index (same on every rank)
    num_groups: int  # groups in this micro-batch index (over all ranks)
    advantages: torch.Tensor  # [b] group-normalised, for the baselines
    old_logprobs: Optional[torch.Tensor] = None  # [N]
    ref_logprobs: Optional[torch.Tensor] = None  # [N]
    engine_logprobs: Optional[torch.Tensor] = None  # [N]

    @property
    def num_response_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch with every tensor on `device` (batches are built on the host)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                # pinned host memory would allow non_blocking; these tensors are small (ids, not activations)
                moved[name] = value.to(device)
        return MicroBatch(**moved)


@dataclass
class MiniBatch:
    micro_batches: list[MicroBatch]  # this rank's, one per micro-batch index
    num_groups: int  # over all ranks
    num_sequences: int
    num_tokens: int  # response tokens, over all ranks
    counts: dict = field(default_factory=dict)


def _least_loaded(loads: list[int], allowed: list[bool] | None = None) -> int:
    best = None
    for i, load in enumerate(loads):
        if allowed is not None and not allowed[i]:
            continue
        if best is None or load < loads[best]:
            best = i
    return best


def plan_mini_batches(
    rollouts: list[Rollout], groups_per_mini: int, groups_per_micro: int, dp_size: int
) -> list[list[list[list[int]]]]:
    """Rollout ids as plan[mini][micro][dp_rank]; every group inside one micro-batch index."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group, []).append(i)
    order = sorted(groups)
    if len(order) % groups_per_mini or groups_per_mini % groups_per_micro:
        raise ValueError(
            f"{len(order)} prompt groups do not split into mini-batches of {groups_per_mini} groups and "
            f"micro-batches of {groups_per_micro} groups"
        )
    micro_per_mini = groups_per_mini // groups_per_micro
    plan = []
    for start in range(0, len(order), groups_per_mini):
        mini_groups = order[start : start + groups_per_mini]
        size = {g: sum(rollouts[i].num_tokens for i in groups[g]) for g in mini_groups}
        micro_groups: list[list[int]] = [[] for _ in range(micro_per_mini)]
        loads = [0] * micro_per_mini
        for g in sorted(mini_groups, key=lambda g: (-size[g], g)):
            k = _least_loaded(loads, [len(m) < groups_per_micro for m in micro_groups])
            micro_groups[k].append(g)
            loads[k] += size[g]
        mini = []
        for gs in micro_groups:
            members = [i for g in gs for i in groups[g]]
            if len(members) < dp_size:
                raise ValueError(
                    f"a micro-batch of {len(gs)} groups holds {len(members)} rollouts, fewer than the {dp_size} "
                    "data-parallel ranks"
                )
            ranks: list[list[int]] = [[] for _ in range(dp_size)]
            rank_loads = [0] * dp_size
            for i in sorted(members, key=lambda i: (-rollouts[i].num_tokens, i)):
                r = _least_loaded(rank_loads)
                ranks[r].append(i)
                rank_loads[r] += rollouts[i].num_tokens
            mini.append([sorted(x) for x in ranks])
        plan.append(mini)
    return plan


def make_micro_batch(
    rollouts: list[Rollout], ids: list[int], micro_groups: list[int], advantages: torch.Tensor,
    *, pad_id: int = 0, pad_to_multiple: int = 1, shape: tuple[int, int] | None = None,
) -> MicroBatch:
    """Right-padded tensors for rollouts `ids`; micro_groups: the groups of this micro-batch index
    (all ranks), in a fixed order, which numbers them 0..len-1. `shape` (rows, width) pads to a
    fixed size with empty rows (pipeline stages exchange activations of one shape)."""
    number = {g: k for k, g in enumerate(micro_groups)}
    lengths = [rollouts[i].num_tokens for i in ids]
    rows_total, width = shape if shape else (len(ids), max(lengths))
    width = -(-width // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((rows_total, width), pad_id, dtype=torch.long)
    rows, cols, targets, seq_index = [], [], [], []
    engine = []
    for b, i in enumerate(ids):
        r = rollouts[i]
        seq = r.prompt_ids + r.response_ids
        tokens[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        p = len(r.prompt_ids)
        # the logit at position t predicts token t+1: response token j is predicted at p + j - 1
        for j, tok in enumerate(r.response_ids):
            rows.append(b)
            cols.append(p + j - 1)
            targets.append(tok)
            seq_index.append(b)
        if r.engine_logprobs is not None:
            engine.extend(r.engine_logprobs)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return MicroBatch(
        rollout_ids=list(ids),
        tokens=tokens,
        position_ids=torch.arange(width).expand(rows_total, -1).contiguous(),
        rows=as_long(rows),
        cols=as_long(cols),
        targets=as_long(targets),
        seq_index=as_long(seq_index),
        rewards=torch.tensor([rollouts[i].reward for i in ids], dtype=torch.float32),
        group_index=as_long([number[rollouts[i].group] for i in ids]),
        num_groups=len(micro_groups),
        advantages=advantages[as_long(ids)].float() if len(ids) else torch.zeros(0),
        engine_logprobs=torch.tensor(engine, dtype=torch.float32) if len(engine) == len(targets) and engine else None,
    )


def build_mini_batches(
    rollouts: list[Rollout], groups_per_mini: int, groups_per_micro: int, dp_size: int, dp_rank: int,
    *, pad_id: int = 0, pad_to_multiple: int = 1, uniform_shape: bool = False,
) -> list[MiniBatch]:
    """This DP rank's mini-batches. uniform_shape: every micro-batch of a mini-batch padded to one
    [rows, width] (what pipeline parallelism needs)."""
    from ..objectives import group_advantages

    for i, r in enumerate(rollouts):
        if not r.response_ids or not r.prompt_ids:
            raise ValueError(f"rollout {i} (group {r.group}) has an empty {'response' if r.prompt_ids else 'prompt'}")
    advantages = group_advantages(
        torch.tensor([r.reward for r in rollouts], dtype=torch.float64), torch.tensor([r.group for r in rollouts])
    )
    minis = []
    for mini in plan_mini_batches(rollouts, groups_per_mini, groups_per_micro, dp_size):
        micro_batches = []
        shape = None
        if uniform_shape:
            shape = (max(len(ranks[dp_rank]) for ranks in mini),
                     max(rollouts[i].num_tokens for ranks in mini for i in ranks[dp_rank]))
        for ranks in mini:
            micro_groups = sorted({rollouts[i].group for ids in ranks for i in ids})
            micro_batches.append(
                make_micro_batch(rollouts, ranks[dp_rank], micro_groups, advantages, pad_id=pad_id,
                                 pad_to_multiple=pad_to_multiple, shape=shape)
            )
        ids = [i for ranks in mini for ids in ranks for i in ids]
        minis.append(
            MiniBatch(
                micro_batches=micro_batches,
                num_groups=len({rollouts[i].group for i in ids}),
                num_sequences=len(ids),
                num_tokens=sum(len(rollouts[i].response_ids) for i in ids),
            )
        )
    return minis
