"""The training step's metrics by name: what each micro-batch records, how each record is reduced
over micro-batches and data-parallel ranks, and what the step reports from them.

Adding a metric is one line in a table below (and its value in the record the actor's loss
function returns, or in a partial it hands over): the reduction, the collective and the names
follow from the table. Every rank of the last pipeline stage reduces; three collectives (sum, min,
max) per step, whatever the number of metrics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

SUM, MIN, MAX = "sum", "min", "max"

# one micro-batch's record (Actor._loss): name -> reduction over micro-batches and DP ranks
RECORDED = {
    "loss": SUM,
    "entropy_sum": SUM,
    "tokens": SUM,
    "score_pos_sum": SUM,
    "score_pos_n": SUM,
    "score_neg_sum": SUM,
    "score_neg_n": SUM,
    "kl_sum": SUM,
    "kl_tokens": SUM,
    "score_pos_min": MIN,
    "score_neg_min": MIN,
    "score_pos_max": MAX,
    "score_neg_max": MAX,
}
# recorded by every micro-batch, reduced over the first update's only (pi_theta = pi_old there)
FIRST_UPDATE = {"score_abs_max": MAX}
# the columns of objectives.importance.mismatch_partials, in order, merged over micro-batches and ranks
MISMATCH_PARTIALS = {
    "mismatch_abs_sum": SUM,
    "mismatch_abs_max": MAX,
    "mismatch_k3_sum": SUM,
    "mismatch_above": SUM,
    "mismatch_tokens": SUM,
}


def _names(table: dict, reduction: str) -> list[str]:
    return [name for name, how in table.items() if how == reduction]


def _columns(reduction: str) -> list[int]:
    return [i for i, how in enumerate(MISMATCH_PARTIALS.values()) if how == reduction]


def metric_tensors(
    records: list[dict], first: list[dict], mismatch: Optional[torch.Tensor], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sums, mins, maxs) of this rank's micro-batch records (float64, on `device`), in the order
    `named` reads them; mismatch: [n, 5] partials or None (zeros)."""

    def stacked(keys, rows):
        return torch.stack([torch.stack([r[k].to(torch.float64) for r in rows]) for k in keys])

    if mismatch is None:
        mismatch = torch.zeros((1, len(MISMATCH_PARTIALS)), dtype=torch.float64, device=device)
    sums = torch.cat([stacked(_names(RECORDED, SUM), records).sum(1), mismatch[:, _columns(SUM)].sum(0)])
    mins = stacked(_names(RECORDED, MIN), records).amin(1)
    maxs = torch.cat(
        [
            stacked(_names(RECORDED, MAX), records).amax(1),
            stacked(_names(FIRST_UPDATE, MAX), first).amax(1),
            mismatch[:, _columns(MAX)].amax(0),
        ]
    )
    return sums, mins, maxs


def all_reduce(sums: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, group) -> None:
    """In place, over `group` (the data-parallel ranks)."""
    dist.all_reduce(sums, group=group)
    dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)


def named(sums: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> dict[str, float]:
    """The reduced tensors as {name: value}, each under the name its table gives it."""
    sum_names = _names(RECORDED, SUM) + [n for n, how in MISMATCH_PARTIALS.items() if how == SUM]
    max_names = (
        _names(RECORDED, MAX) + _names(FIRST_UPDATE, MAX) + [n for n, how in MISMATCH_PARTIALS.items() if how == MAX]
    )
    out = dict(zip(sum_names, sums.tolist()))
    out.update(zip(_names(RECORDED, MIN), mins.tolist()))
    out.update(zip(max_names, maxs.tolist()))
    return out


def report(values: dict[str, float], updates: list[dict], kl: bool) -> dict:
    """What a step reports, from the reduced values and the updates' host numbers (grad_norm, lr,
    skipped); kl: whether the objective has a KL term."""
    v, n = values, len(updates)
    applied = [u for u in updates if not u["skipped"]]  # a skipped update has no norm
    out = {
        "loss": v["loss"] / n,
        "entropy": v["entropy_sum"] / max(v["tokens"], 1),
        "score_pos_mean": v["score_pos_sum"] / v["score_pos_n"] if v["score_pos_n"] else float("nan"),
        "score_neg_mean": v["score_neg_sum"] / v["score_neg_n"] if v["score_neg_n"] else float("nan"),
        "score_pos_min": v["score_pos_min"],
        "score_pos_max": v["score_pos_max"],
        "score_neg_min": v["score_neg_min"],
        "score_neg_max": v["score_neg_max"],
        "grad_norm": sum(u["grad_norm"] for u in applied) / len(applied) if applied else float("nan"),
        "lr": updates[-1]["lr"],
        "skipped_updates": sum(u["skipped"] for u in updates),
        # the first optimizer step of this batch sees pi_theta = pi_old: s̄ should be 0
        "first_update_score_abs_max": v["score_abs_max"],
    }
    if kl:  # k3 per token against the KL target, over every update of the step
        out["kl_mean"] = v["kl_sum"] / v["kl_tokens"] if v["kl_tokens"] else float("nan")
    if compared := v["mismatch_tokens"]:  # train-inference mismatch, log pi_old vs the engine's, per token
        out.update(
            mismatch_abs_mean=v["mismatch_abs_sum"] / compared,
            mismatch_abs_max=v["mismatch_abs_max"],
            mismatch_kl=v["mismatch_k3_sum"] / compared,
            mismatch_frac=v["mismatch_above"] / compared,
        )
    return out
