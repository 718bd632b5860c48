"""Rollouts -> group-aligned, token-balanced micro-batches for every data-parallel rank.

A rollout batch holds G rollouts for each of P prompt groups. It is cut into mini-batches of whole
groups (one optimizer step each), each mini-batch into micro-batch indices of whole groups, and
each micro-batch's rollouts are spread over the DP ranks. A group never straddles two micro-batch
indices (its rollouts may sit on several ranks), so REAL's group log-sum-exp for micro-batch k is
exact with one collective. Every rank computes the same plan.

Micro-batches are cut either by a token budget (`max_tokens`: the tokens of every (micro-batch,
rank) stay within it; groups first-fit, longest first, so the number of micro-batches follows the
rollouts' lengths) or by a count of groups. Within a micro-batch, rollouts go to ranks longest first
onto the least-loaded rank (in tokens), so ranks do similar work.

Tensors per (micro-batch, rank) are either one packed row (THD: the rollouts one after another,
`cu_seqlens` marking where each starts, positions restarting at each; padded only at the end, to a
small multiple) or right-padded rows [b, s]. Either way `rows`/`cols` name the positions that
predict response tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..objectives.policy_gradient import group_advantages
from ..rollout.types import Rollout, informative_groups
from .context_parallel import layout_of, split_micro_batch, tokens_per_rank


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
    active: Optional[torch.Tensor] = None  # [b] bool: in the loss and in its group
    cu_seqlens: Optional[torch.Tensor] = None  # packed: int32 [n + 1] sequence starts in the row (pad tail included)
    max_seqlen: int = 0  # packed: the longest segment
    sequence_tokens: int = 0  # prompt + response tokens of its rollouts (the rest of `tokens` is padding)
    old_logprobs: Optional[torch.Tensor] = None  # [N]
    ref_logprobs: Optional[torch.Tensor] = None  # [N]
    engine_logprobs: Optional[torch.Tensor] = None  # [N]
    # [N] bool: the tokens the model sampled (multi-turn: its turns, not what came between them);
    # None: every response token. Per token of the whole micro-batch, so the CP split leaves it as is
    loss_mask: Optional[torch.Tensor] = None
    # context parallelism (context_parallel.py): rows/cols/targets are then this CP rank's share
    cu_seqlens_padded: Optional[torch.Tensor] = None  # int32: global padded sequence starts (cu_seqlens: real)
    cp_source: Optional[torch.Tensor] = None  # [N] each token's place in the CP-gathered [C * cp_tokens] values
    cp_tokens: int = 0  # the most response tokens one CP rank scores
    # the engine's experts at each token slot of `tokens`, int16 [b, s, MoE layers, top_k]; -1 where
    # the engine routed nothing (each rollout's last token, padding); None when no rollout carries them
    routed_experts: Optional[torch.Tensor] = None
    # packed: the host copy of the segment bounds attention reads (cu_seqlens_padded where set, else
    # cu_seqlens), taken by to() before the tensors leave the host: no layer reads them from the device
    attention_bounds: tuple[int, ...] = ()

    @property
    def num_response_tokens(self) -> int:
        return int(self.seq_index.numel())

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def packed_seq_params(self):
        """megatron-core's PackedSeqParams for a packed row (None for padded rows)."""
        if self.cu_seqlens is None:
            return None
        from .packed_attention import PackedRow

        return PackedRow(
            bounds=self.attention_bounds or self._bounds(),
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def _bounds(self) -> tuple[int, ...]:
        cu = self.cu_seqlens if self.cu_seqlens_padded is None else self.cu_seqlens_padded
        return tuple(cu.tolist())

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with every tensor on `device` (batches are built on the host)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.packed:
            moved["attention_bounds"] = self._bounds()  # from the host tensors: no sync
        for name, value in moved.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                if device.type == "cuda":  # staged through pinned memory: the copy does not block the host
                    value = value.pin_memory()
                moved[name] = value.to(device, non_blocking=device.type == "cuda")
        return MicroBatch(**moved)


@dataclass
class MiniBatch:
    micro_batches: list[MicroBatch]  # this rank's, one per micro-batch index
    num_groups: int  # over all ranks
    num_sequences: int
    num_tokens: int  # response tokens, over all ranks
    num_informative_sequences: int = 0  # rollouts of groups with both labels
    counts: dict = field(default_factory=dict)


def _least_loaded(loads: list[int], allowed: list[bool] | None = None) -> int:
    best = None
    for i, load in enumerate(loads):
        if allowed is not None and not allowed[i]:
            continue
        if best is None or load < loads[best]:
            best = i
    return best


def _spread(cost: list[int], members: list[int], dp_size: int) -> tuple[list[list[int]], list[int]]:
    """Rollouts onto ranks, longest first onto the least-loaded: (ids per rank, tokens per rank).
    cost: each rollout's tokens on a rank (its length, or its share after the CP split)."""
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0] * dp_size
    for i in sorted(members, key=lambda i: (-cost[i], i)):
        r = _least_loaded(loads)
        ranks[r].append(i)
        loads[r] += cost[i]
    return [sorted(x) for x in ranks], loads


def _micro_by_count(size: dict[int, int], mini_groups: list[int], groups_per_micro: int) -> list[list[int]]:
    micro_groups: list[list[int]] = [[] for _ in range(len(mini_groups) // groups_per_micro)]
    loads = [0] * len(micro_groups)
    for g in sorted(mini_groups, key=lambda g: (-size[g], g)):
        k = _least_loaded(loads, [len(m) < groups_per_micro for m in micro_groups])
        micro_groups[k].append(g)
        loads[k] += size[g]
    return micro_groups


def _micro_by_budget(
    rollouts: list[Rollout],
    groups: dict[int, list[int]],
    size: dict[int, int],
    mini_groups: list[int],
    dp_size: int,
    budget: int,
    cost: list[int],
    cp: int = 1,
    multiple: int = 1,
) -> list[list[int]]:
    """First fit, largest group first: a group joins the first micro-batch whose rollouts, spread
    over the ranks, keep every rank within `budget` tokens (`cost`: after the CP split); else it
    opens a new micro-batch."""
    micro_groups: list[list[int]] = []
    for g in sorted(mini_groups, key=lambda g: (-size[g], g)):
        longest = max(groups[g], key=lambda i: (cost[i], -i))
        if cost[longest] > budget:
            raise ValueError(_too_long(rollouts, longest, cost[longest], budget, cp, multiple))
        for gs in micro_groups:
            if max(_spread(cost, [i for h in gs + [g] for i in groups[h]], dp_size)[1]) <= budget:
                gs.append(g)
                break
        else:
            if max(_spread(cost, groups[g], dp_size)[1]) > budget:
                raise ValueError(
                    f"prompt group {g} ({len(groups[g])} rollouts, {size[g]} tokens{' per CP rank' if cp > 1 else ''}) "
                    "does not fit one micro-batch of "
                    f"{dp_size} data-parallel ranks x actor.max_tokens_per_micro_batch={budget} tokens (a group "
                    "cannot be split across micro-batches: REAL normalises over it); raise the budget"
                )
            micro_groups.append([g])
    return micro_groups


def _too_long(rollouts: list[Rollout], i: int, tokens: int, budget: int, cp: int, multiple: int) -> str:
    """The error for a rollout longer than the budget: which one, and the parallel.cp that would fit it."""
    r = rollouts[i]
    where = f"rollout {i} (prompt group {r.group}{', ' + r.source if r.source else ''})"
    length = r.num_tokens
    fits = next((c for c in (2, 4, 8, 16, 32, 64) if c > cp and tokens_per_rank(length, c, multiple) <= budget), None)
    split = f" ({tokens} per rank after the parallel.cp={cp} split)" if cp > 1 else ""
    hint = (
        f"; or set parallel.cp={fits} (context parallelism: {tokens_per_rank(length, fits, multiple)} tokens per rank)"
        if fits
        else ""
    )
    return (
        f"{where} has {length} tokens{split}, more than actor.max_tokens_per_micro_batch={budget}; raise the "
        f"budget to at least data.max_prompt_tokens + rollout.max_new_tokens{' per CP rank' if cp > 1 else ''}" + hint
    )


def rank_tokens(rollouts: list[Rollout], cp: int = 1, multiple: int = 1) -> list[int]:
    """Each rollout's tokens on one rank: its length, or under CP its share after the split."""
    if cp == 1:
        return [r.num_tokens for r in rollouts]
    return [tokens_per_rank(r.num_tokens, cp, multiple) for r in rollouts]


def plan_mini_batches(
    rollouts: list[Rollout],
    groups_per_mini: int,
    groups_per_micro: int,
    dp_size: int,
    max_tokens: int | None = None,
    cp: int = 1,
    multiple: int = 1,
) -> list[list[list[list[int]]]]:
    """Rollout ids as plan[mini][micro][dp_rank]; every group inside one micro-batch index.
    max_tokens: cut micro-batches by this token budget per rank instead of groups_per_micro, each
    rollout counted by its tokens per rank after a split over `cp` context-parallel ranks (each
    sequence padded to 2 x cp x `multiple`)."""
    cost = rank_tokens(rollouts, cp, multiple)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group, []).append(i)
    order = sorted(groups)
    if len(order) % groups_per_mini or (max_tokens is None and groups_per_mini % groups_per_micro):
        raise ValueError(
            f"{len(order)} prompt groups do not split into mini-batches of {groups_per_mini} groups"
            + ("" if max_tokens else f" and micro-batches of {groups_per_micro} groups")
        )
    plan = []
    for start in range(0, len(order), groups_per_mini):
        mini_groups = order[start : start + groups_per_mini]
        size = {g: sum(cost[i] for i in groups[g]) for g in mini_groups}  # tokens per rank (after a CP split)
        if max_tokens:
            micro_groups = _micro_by_budget(
                rollouts, groups, size, mini_groups, dp_size, max_tokens, cost, cp, multiple
            )
        else:
            micro_groups = _micro_by_count(size, mini_groups, groups_per_micro)
        mini = []
        for gs in micro_groups:
            members = [i for g in gs for i in groups[g]]
            if len(members) < dp_size:
                raise ValueError(
                    f"a micro-batch of {len(gs)} groups holds {len(members)} rollouts, fewer than the {dp_size} "
                    "data-parallel ranks"
                )
            mini.append(_spread(cost, members, dp_size)[0])
        plan.append(mini)
    return plan


def make_micro_batch(
    rollouts: list[Rollout],
    ids: list[int],
    micro_groups: list[int],
    advantages: torch.Tensor,
    *,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    shape: tuple[int, int] | None = None,
    packed: bool = False,
) -> MicroBatch:
    """Tensors for rollouts `ids`: one packed row (`packed`) or right-padded rows. micro_groups: the
    groups of this micro-batch index (all ranks), in a fixed order, which numbers them 0..len-1.
    `shape` (rows, width) pads to a fixed size (pipeline stages exchange activations of one shape):
    empty rows when padded; a longer row, the tail one padding segment, when packed."""
    number = {g: k for k, g in enumerate(micro_groups)}
    lengths = [rollouts[i].num_tokens for i in ids]
    if packed:
        rows_total, width = 1, max(sum(lengths), shape[1] if shape else 0)
    else:
        rows_total, width = shape if shape else (len(ids), max(lengths))
    width = -(-width // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((rows_total, width), pad_id, dtype=torch.long)
    # packed: filled per sequence below (restarting at each); padded rows: 0..width-1 on every row
    if packed:
        positions = torch.zeros((1, width), dtype=torch.long)
    else:
        positions = torch.arange(width).expand(rows_total, -1).contiguous()
    rows, cols, targets, seq_index, starts, mask = [], [], [], [], [], []
    engine: list[float] | None = []
    offset = 0
    for b, i in enumerate(ids):
        r = rollouts[i]
        seq = r.prompt_ids + r.response_ids
        row, start = (0, offset) if packed else (b, 0)
        tokens[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        if packed:
            positions[0, start : start + len(seq)] = torch.arange(len(seq))  # RoPE restarts at each sequence
        starts.append(start)
        p = start + len(r.prompt_ids)
        # the logit at position t predicts token t+1: response token j is predicted at p + j - 1
        rows.extend([row] * len(r.response_ids))
        cols.extend(range(p - 1, p - 1 + len(r.response_ids)))
        targets.extend(r.response_ids)
        seq_index.extend([b] * len(r.response_ids))
        mask.extend(r.response_mask if r.response_mask is not None else [True] * len(r.response_ids))
        offset += len(seq)
        if engine is not None and r.engine_logprobs is not None and len(r.engine_logprobs) == len(r.response_ids):
            engine.extend(r.engine_logprobs)
        else:
            engine = None  # the engine's log-probs are used only when every rollout has them
    routed = _routed_experts_slots(
        rollouts, ids, starts, [0] * len(ids) if packed else list(range(len(ids))), tokens.shape
    )
    cu_seqlens, max_seqlen = None, 0
    if packed:
        bounds = starts + [offset] + ([width] if width > offset else [])  # the padding tail is a segment of its own
        positions[0, offset:] = torch.arange(width - offset)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return MicroBatch(
        rollout_ids=list(ids),
        tokens=tokens,
        position_ids=positions,
        rows=as_long(rows),
        cols=as_long(cols),
        targets=as_long(targets),
        seq_index=as_long(seq_index),
        rewards=torch.tensor([rollouts[i].reward for i in ids], dtype=torch.float32),
        group_index=as_long([number[rollouts[i].group] for i in ids]),
        num_groups=len(micro_groups),
        advantages=advantages[as_long(ids)].float() if len(ids) else torch.zeros(0),
        active=torch.tensor([rollouts[i].in_loss for i in ids], dtype=torch.bool),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        sequence_tokens=offset,
        engine_logprobs=torch.tensor(engine, dtype=torch.float32) if engine is not None else None,
        routed_experts=routed,
        loss_mask=None if all(mask) else torch.tensor(mask, dtype=torch.bool),
    )


def _routed_experts_slots(
    rollouts: list[Rollout], ids: list[int], starts: list[int], rows: list[int], shape: torch.Size
) -> Optional[torch.Tensor]:
    """The engine's experts laid out like the token slots ([b, s, layers, k], -1 where none)."""
    carried = [rollouts[i].routed_experts for i in ids if rollouts[i].routed_experts is not None]
    if not carried:
        return None
    out = torch.full((*shape, *carried[0].shape[1:]), -1, dtype=torch.int16)
    for i, row, start in zip(ids, rows, starts):
        experts = rollouts[i].routed_experts
        if experts is not None:
            out[row, start : start + experts.shape[0]] = experts.to(torch.int16)
    return out


def padding_fraction(micro_batches: list[MicroBatch]) -> float:
    """Share of the token slots fed to the model that hold padding, not rollout tokens."""
    slots = sum(mb.tokens.numel() for mb in micro_batches)
    used = sum(mb.sequence_tokens for mb in micro_batches)
    return 1.0 - used / max(1, slots)


def build_mini_batches(
    rollouts: list[Rollout],
    groups_per_mini: int,
    groups_per_micro: int,
    dp_size: int,
    dp_rank: int,
    *,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    uniform_shape: bool = False,
    packed: bool = False,
    max_tokens: int | None = None,
    cp_size: int = 1,
    cp_rank: int = 0,
    same_shape_across_ranks: bool = False,
) -> list[MiniBatch]:
    """This DP rank's mini-batches. uniform_shape: every micro-batch of a mini-batch padded to one
    [rows, width] (what pipeline parallelism needs). packed: one packed row per micro-batch.
    max_tokens: micro-batches by this token budget per rank (else groups_per_micro groups each).
    cp_size > 1: each packed row split over the context-parallel ranks, this one's share
    (context_parallel.py; pad_to_multiple then applies to each sequence's chunks).
    same_shape_across_ranks: that one shape is the largest over every DP rank too (megatron's
    allgather MoE dispatcher gathers equal-sized token blocks from the expert-parallel ranks)."""
    if cp_size > 1 and not packed:
        raise ValueError("context parallelism needs packed sequences (actor.pack_sequences: true)")
    if cp_size > 1 and same_shape_across_ranks:
        raise ValueError(
            "context parallelism with the allgather MoE dispatcher is not supported (model.moe_dispatcher: alltoall)"
        )
    for i, r in enumerate(rollouts):
        if not r.response_ids or not r.prompt_ids:
            raise ValueError(f"rollout {i} (group {r.group}) has an empty {'response' if r.prompt_ids else 'prompt'}")
        if r.response_mask is not None and len(r.response_mask) != len(r.response_ids):
            raise ValueError(
                f"rollout {i} (group {r.group}) has a response mask of {len(r.response_mask)} for "
                f"{len(r.response_ids)} response tokens"
            )
    # over each group's rollouts in the loss; those out of it get 0
    active = torch.tensor([r.in_loss for r in rollouts], dtype=torch.bool)
    advantages = torch.zeros(len(rollouts), dtype=torch.float64)
    if active.any():
        advantages[active] = group_advantages(
            torch.tensor([r.reward + r.penalty for r in rollouts], dtype=torch.float64)[active],
            torch.tensor([r.group for r in rollouts])[active],
        )
    informative = informative_groups(rollouts)
    minis = []
    plan = plan_mini_batches(
        rollouts, groups_per_mini, groups_per_micro, dp_size, max_tokens, cp=cp_size, multiple=pad_to_multiple
    )
    for mini in plan:
        micro_batches = []
        shape = None
        sizes = range(dp_size) if same_shape_across_ranks else [dp_rank]  # whose micro-batches set the shape
        if (uniform_shape or same_shape_across_ranks) and packed and cp_size == 1:
            shape = (1, max(sum(rollouts[i].num_tokens for i in ranks[r]) for ranks in mini for r in sizes))
        elif (uniform_shape or same_shape_across_ranks) and not packed:
            shape = (
                max(len(ranks[r]) for ranks in mini for r in sizes),
                max(rollouts[i].num_tokens for ranks in mini for r in sizes for i in ranks[r]),
            )
        for ranks in mini:
            micro_groups = sorted({rollouts[i].group for ids in ranks for i in ids})
            micro_batches.append(
                make_micro_batch(
                    rollouts,
                    ranks[dp_rank],
                    micro_groups,
                    advantages,
                    pad_id=pad_id,
                    pad_to_multiple=pad_to_multiple if cp_size == 1 else 1,
                    shape=shape,
                    packed=packed,
                )
            )
        if cp_size > 1:  # every micro-batch of the mini-batch one width under PP (stages exchange one shape)
            width = (
                max(layout_of(mb, cp_size, pad_to_multiple).local_width for mb in micro_batches)
                if uniform_shape
                else None
            )
            micro_batches = [
                split_micro_batch(mb, cp_size, cp_rank, multiple=pad_to_multiple, width=width, pad_id=pad_id)
                for mb in micro_batches
            ]
        ids = [i for ranks in mini for ids in ranks for i in ids]
        in_loss = [i for i in ids if rollouts[i].in_loss]
        minis.append(
            MiniBatch(
                micro_batches=micro_batches,
                num_groups=len({rollouts[i].group for i in ids}),
                num_sequences=len(in_loss),
                num_tokens=sum(rollouts[i].num_model_tokens for i in in_loss),
                num_informative_sequences=sum(rollouts[i].group in informative for i in in_loss),
            )
        )
    return minis
