"""Context parallelism (parallel.cp = C): each packed sequence split over the C ranks of a CP group.

The layout is megatron's and Transformer Engine's load-balanced causal one, so a TE run reads the
same data: every sequence is padded to a multiple of 2C (times TP under sequence parallelism) and
cut into 2C equal chunks; CP rank r holds chunks r and 2C-1-r, one after the other, for every
sequence of the micro-batch. Causal attention work is then the same on every rank (an early chunk
is cheap, its mirror expensive). Each rank's row is the concatenation of its two chunks of each
sequence; `PackedSeqParams` carries the *global* padded cu_seqlens (megatron's THD RoPE and TE's
attention divide them by C themselves), position ids are those of the original sequence.

The loss: a response token is scored where the hidden state that predicts it lives (the position
before it, which may sit on another chunk or rank than the token itself), through the same fused
output layer on each shard. Each rank's token log-probs and entropies (N floats, the response
tokens only) are then all-gathered over the CP group and put back in the micro-batch's token
order, so every objective, importance weight, KL term and metric runs unchanged on every CP rank
and is exact. Backward takes each rank's own slice of the gradient (every CP rank computes the
same loss; the sum of their parameter gradients, which DDP forms over DP x CP, is the full one).
megatron's schedule multiplies a 2-tuple loss by the CP size, undoing DDP's average over CP.
"""

from __future__ import annotations

import dataclasses

import torch


def padded_length(length: int, cp: int, multiple: int = 1) -> int:
    """A sequence's length padded to 2C chunks of equal size (times `multiple`: TP under SP)."""
    unit = 2 * cp * multiple
    return -(-length // unit) * unit


def tokens_per_rank(length: int, cp: int, multiple: int = 1) -> int:
    """Tokens of a sequence of `length` on each CP rank after the split (its two chunks)."""
    return padded_length(length, cp, multiple) // cp


def chunk_owner(position: torch.Tensor, chunk: torch.Tensor, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, offset within that rank's part of the sequence) of positions within a sequence whose
    chunks are `chunk` tokens long: chunk k lives on rank k (first half) or 2C-1-k (second half)."""
    k = torch.div(position, chunk, rounding_mode="floor")
    rank = torch.where(k < cp, k, 2 * cp - 1 - k)
    offset = position - k * chunk + torch.where(k < cp, 0, chunk)
    return rank, offset


@dataclasses.dataclass
class Layout:
    """Where a micro-batch's packed sequences sit under CP (the same on every rank)."""

    padded: list[int]  # global padded length of each segment (sequences, then a padding tail if any)
    lengths: list[int]  # their real lengths
    cp: int

    @property
    def local_starts(self) -> list[int]:
        """Where each segment starts in a rank's row."""
        out, at = [], 0
        for n in self.padded:
            out.append(at)
            at += n // self.cp
        return out

    @property
    def local_width(self) -> int:
        return sum(self.padded) // self.cp

    def locate(self, segment: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CP rank, column in that rank's row) of `position` within segment `segment`."""
        padded = torch.tensor(self.padded, dtype=torch.long)[segment]
        rank, offset = chunk_owner(position, padded // (2 * self.cp), self.cp)
        return rank, torch.tensor(self.local_starts, dtype=torch.long)[segment] + offset


def layout_of(mb, cp: int, multiple: int = 1, width: int | None = None) -> Layout:
    """The CP layout of a packed micro-batch (cp = 1 form, from make_micro_batch); `width`: a rank's
    row padded to this many tokens by a padding segment at the end (pipeline stages need one shape)."""
    n = mb.rewards.numel()
    bounds = mb.cu_seqlens.tolist()[: n + 1]
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    padded = [padded_length(x, cp, multiple) for x in lengths]
    layout = Layout(padded, lengths, cp)
    if width is not None and width < layout.local_width:
        raise ValueError(f"a CP row of {layout.local_width} tokens does not fit the width {width} asked for")
    if width is not None and width > layout.local_width:
        extra = width - layout.local_width
        if extra % (2 * multiple):
            raise ValueError(
                f"a CP row of {layout.local_width} tokens cannot be padded to {width} in chunks of {2 * multiple}"
            )
        layout.padded.append(extra * cp)
        layout.lengths.append(extra * cp)
    return layout


def split_micro_batch(mb, cp: int, rank: int, *, multiple: int = 1, width: int | None = None, pad_id: int = 0):
    """CP rank `rank`'s share of a packed micro-batch built for cp = 1: its two chunks of every
    sequence (tokens, original positions), the response tokens whose predicting position it holds
    (rows/cols/targets: what the output layer scores here), `cp_source` (where each of the
    micro-batch's tokens lands in the gathered [C, N_max] log-probs) and the global cu_seqlens,
    real and padded. Per-sequence and per-token tensors of the whole micro-batch (seq_index,
    rewards, engine log-probs, ...) stay as they were: the loss sees every token on every CP rank."""
    if not mb.packed:
        raise ValueError("context parallelism needs packed sequences (actor.pack_sequences: true)")
    layout = layout_of(mb, cp, multiple, width)
    n = mb.rewards.numel()
    starts = mb.cu_seqlens[:n].long()
    row = torch.full((1, layout.local_width), pad_id, dtype=torch.long)
    positions = torch.zeros((1, layout.local_width), dtype=torch.long)
    real_tokens = 0
    for segment, (padded, length) in enumerate(zip(layout.padded, layout.lengths)):
        where = torch.arange(padded)
        owner, column = layout.locate(torch.full_like(where, segment), where)
        mine = owner == rank
        positions[0, column[mine]] = where[mine]
        if segment < n:
            real = mine & (where < length)
            row[0, column[real]] = mb.tokens[0, starts[segment] + where[real]]
            real_tokens += int(real.sum())
    # response tokens: predicted at position q of their sequence (the one before them)
    seq = mb.seq_index
    owner, column = layout.locate(seq, mb.cols - starts[seq])
    mine = owner == rank
    counts = torch.bincount(owner, minlength=cp)
    slot = torch.zeros_like(owner)  # each token's index among its owner's tokens, in token order
    for r in range(cp):
        slot[owner == r] = torch.arange(int(counts[r]))
    n_max = int(counts.max()) if owner.numel() else 0
    padded_bounds = torch.tensor([0] + layout.padded).cumsum(0).to(torch.int32)
    real_bounds = torch.tensor([0] + layout.lengths).cumsum(0).to(torch.int32)
    return dataclasses.replace(
        mb,
        tokens=row,
        position_ids=positions,
        rows=torch.zeros(int(mine.sum()), dtype=torch.long),
        cols=column[mine],
        targets=mb.targets[mine],
        cp_source=owner * n_max + slot,
        cp_tokens=n_max,
        cu_seqlens=real_bounds,
        cu_seqlens_padded=padded_bounds,
        max_seqlen=max(layout.padded),
        sequence_tokens=real_tokens,
    )


class _GatherTokens(torch.autograd.Function):
    """All-gather [C, n] over the CP group; backward: this rank's slice (every rank computes the
    same loss from the gathered values, so no sum is needed)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rank: int, what: str):
        from ..kernels.collectives import all_gather_stack

        ctx.rank = rank
        return all_gather_stack(local, group, what)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None, None


def full_token_values(mb, group, rank: int, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each of `values` ([n_local], this rank's response tokens) as [N] in the micro-batch's token
    order, from every CP rank's share: one all-gather of [len(values), N_max]."""
    n_max = mb.cp_tokens
    local = torch.stack([v.float() if v.dtype != torch.float64 else v for v in values])
    padded = local.new_zeros(len(values), n_max)
    padded[:, : local.shape[1]] = local
    gathered = _GatherTokens.apply(padded, group, rank, "context-parallel token log-probs")  # [C, k, N_max]
    flat = gathered.transpose(0, 1).reshape(len(values), -1)
    return [flat[i][mb.cp_source].to(v.dtype) for i, v in enumerate(values)]
