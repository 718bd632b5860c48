"""Where each trainer rank sits in the (tp, cp, dp, pp) grid, in megatron-core's default order.

megatron-core's parallel_state orders ranks "tp-cp-ep-dp-pp" (tensor parallel fastest), so
global rank = tp + TP * (cp + CP * (dp + DP * pp)). Tensor-parallel peers share a node whenever
TP divides the GPUs per node, which is what the high-bandwidth links are for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ParallelConfig


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: int
    local_rank: int
    tp: int
    cp: int
    dp: int
    pp: int


def rank_places(p: ParallelConfig) -> list[RankPlace]:
    places = []
    for rank in range(p.world_size):
        tp, rest = rank % p.tp, rank // p.tp
        cp, rest = rest % p.cp, rest // p.cp
        dp, pp = rest % p.dp, rest // p.dp
        places.append(RankPlace(rank, rank // p.gpus_per_node, rank % p.gpus_per_node, tp, cp, dp, pp))
    return places


def describe_layout(p: ParallelConfig, max_rows: int = 64) -> str:
    lines = [
        f"world size {p.world_size} = {p.nodes} node(s) x {p.gpus_per_node} process(es); "
        f"tp={p.tp} pp={p.pp}{f' (vpp={p.vpp})' if p.vpp else ''} cp={p.cp} dp={p.dp} (derived)"
        f"{' +sequence-parallel' if p.sequence_parallel else ''}",
    ]
    if p.tp > p.gpus_per_node:
        lines.append(
            f"note: tp={p.tp} spans nodes (gpus_per_node={p.gpus_per_node}); TP traffic will cross the network"
        )
    places = rank_places(p)
    lines.append(f"{'rank':>5} {'node':>5} {'local':>5} {'tp':>4} {'cp':>4} {'dp':>4} {'pp':>4}")
    for place in places[:max_rows]:
        lines.append(
            f"{place.rank:>5} {place.node:>5} {place.local_rank:>5} {place.tp:>4} {place.cp:>4} {place.dp:>4} {place.pp:>4}"
        )
    if len(places) > max_rows:
        lines.append(f"... {len(places) - max_rows} more ranks")
    return "\n".join(lines)


def launched_servers(cfg) -> int:
    """SGLang servers the job starts (none when attached by URL or with the embedded engine)."""
    r = cfg.rollout
    return r.num_servers if r.backend == "sglang" and not r.server_urls else 0


def describe_nodes(cfg) -> tuple[str, str | None]:
    """Which GPUs of which nodes the trainer and the SGLang servers use, and why that does not fit
    parallel.node_gpus (None when it does)."""
    p, r = cfg.parallel, cfg.rollout
    servers, tp = launched_servers(cfg), r.server_tp
    if servers and r.colocate:  # the servers on the trainer's own GPUs, server_tp each
        per_node = -(-servers // p.nodes)
        text = (
            f"{p.nodes} node(s) of {p.node_gpus} GPUs, each: GPUs 0-{p.gpus_per_node - 1} trainer ranks and, "
            f"colocated on them, {per_node} SGLang server(s) x tp={tp}"
        )
        if per_node * tp != p.gpus_per_node or p.gpus_per_node > p.node_gpus:
            return text, (
                f"colocated, the {per_node} SGLang server(s) per node x rollout.server_tp={tp} must cover the "
                f"parallel.gpus_per_node={p.gpus_per_node} trainer GPUs exactly (one server rank per GPU), "
                f"within parallel.node_gpus={p.node_gpus}"
            )
        return text, None
    if servers and r.fleet_nodes == 0:  # the servers share the trainer's node(s), on the GPUs after its ranks
        per_node = -(-servers // p.nodes)
        used = p.gpus_per_node + per_node * tp
        text = (
            f"{p.nodes} node(s) of {p.node_gpus} GPUs, each: GPUs 0-{p.gpus_per_node - 1} trainer ranks, "
            f"{p.gpus_per_node}-{used - 1} {per_node} SGLang server(s) x tp={tp}"
        )
        if used > p.node_gpus:
            return text, (
                f"parallel.gpus_per_node={p.gpus_per_node} trainer GPUs and {per_node} SGLang server(s) x "
                f"rollout.server_tp={tp} need {used} GPUs per node; a node has parallel.node_gpus={p.node_gpus}"
            )
        return text, None
    text = f"{p.nodes} trainer node(s) x {p.gpus_per_node} GPUs"
    problem = None
    if p.gpus_per_node > p.node_gpus:
        problem = f"parallel.gpus_per_node={p.gpus_per_node} exceeds parallel.node_gpus={p.node_gpus}"
    if servers:
        text += f"; {r.fleet_nodes} fleet node(s): {servers} SGLang server(s) x tp={tp}"
        if servers * tp > r.fleet_nodes * p.node_gpus:
            problem = (
                f"{servers} SGLang server(s) x rollout.server_tp={tp} need {servers * tp} GPUs; "
                f"rollout.fleet_nodes={r.fleet_nodes} node(s) have {r.fleet_nodes * p.node_gpus}"
            )
    return text, problem
