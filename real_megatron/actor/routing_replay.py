"""Routing replay: the actor routes each token to the experts the rollout engine routed it to.

With `actor.routing_replay: rollout` (the default; it acts on mixture-of-experts models) every
forward of the actor, the old-log-prob pass and every update, takes each MoE layer's top-k experts
from the rollout (rollout/routing.py) instead of its own router's top-k. The router's weights still
come from the actor's own scores at those experts (megatron-core gathers them), so the router
keeps its gradient. Tokens the engine never fed through the model (each rollout's last response
token, padding) keep the actor's own choice: the last token's routing reaches no loss term (the
attention is causal and nothing after it is scored).

Whether replayed or not, the old-log-prob pass measures `routing_mismatch_frac`: the share of
(token, MoE layer) pairs where the actor's own top-k (as a set) differs from the engine's.

The hook is megatron-core's: every TopKRouter passes its `router_replay` object to
`topk_routing_with_score_function`, which asks it for the top-k. This module sets one
`ReplayTopK` (a RouterReplay whose top-k also measures and falls back per token) on each router of
the actor's chunks, feeds it the micro-batch's experts right before each forward, and keeps a
queue for activation recompute: a layer checkpointed in the forward (megatron's
CheckpointFunction: `is_checkpointing()` without grad) runs its router again in the backward
(`is_checkpointing()` with grad), and under pipeline schedules other micro-batches' forwards come
in between; forwards and recomputes of one layer meet in the same order, so a FIFO pairs them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.moe.router_replay import RouterReplay

from .moe import moe_layers
from .weights import unwrap

ROUTING_REPLAY_MODES = ("none", "rollout")


class ReplayTopK(RouterReplay):
    """One router's top-k: the engine's experts where given (replay on), the router's own elsewhere;
    counts where the two differ while measuring."""

    def __init__(self, ordinal: int, replay: bool):
        # RouterReplay.__init__ would also register this object in megatron's global list, which
        # outlives models (tests build many): the same fields, without it
        self.target_topk_idx: Optional[torch.Tensor] = None
        self.recorded_topk_idx: Optional[torch.Tensor] = None
        self.router_replay_action = None
        self.replay_backward_list: list[torch.Tensor] = []
        self.ordinal = ordinal  # which MoE layer of the model (index into a rollout's layer axis)
        self.replay = replay
        self.measuring = False
        self.mismatched = torch.zeros((), dtype=torch.float64)
        self.compared = torch.zeros((), dtype=torch.float64)

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        recomputing = is_checkpointing() and torch.is_grad_enabled()
        if recomputing:  # the backward's rerun of a checkpointed layer: its forward's experts
            target = self.replay_backward_list.pop(0) if self.replay_backward_list else None
        else:
            target = self.target_topk_idx
            if is_checkpointing():  # a checkpointed forward: its recompute comes later, in this order
                self.replay_backward_list.append(target)
        values, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if target is None:
            self.recorded_topk_idx = own
            return values, own
        target = target.to(device=own.device, dtype=own.dtype)
        if target.shape != own.shape:
            raise ValueError(
                f"routing replay, MoE layer {self.ordinal}: the micro-batch gives experts of shape "
                f"{tuple(target.shape)} for a router that routes {tuple(own.shape)}"
            )
        given = target[:, 0] >= 0  # tokens the engine routed
        if self.measuring and not recomputing:
            differ = (own.sort(dim=-1).values != target.sort(dim=-1).values).any(dim=-1) & given
            self.mismatched = self.mismatched.to(own.device) + differ.sum()
            self.compared = self.compared.to(own.device) + given.sum()
        if not self.replay:
            self.recorded_topk_idx = own
            return values, own
        chosen = torch.where(given.unsqueeze(1), target, own)
        self.recorded_topk_idx = chosen
        # megatron's own replay step: the router's scores at the replayed experts
        return scores.gather(1, chosen), chosen


class RoutingReplay:
    """The ReplayTopK of every router of some model chunks, fed per micro-batch."""

    def __init__(
        self,
        chunks: list,
        *,
        replay: bool,
        moe_layer_indices: list[int],
        tp_rank: int = 0,
        tp_size: int = 1,
        sequence_parallel: bool = False,
    ):
        ordinal = {layer: k for k, layer in enumerate(moe_layer_indices)}
        self.replay = replay
        self.by_chunk: dict[int, list[ReplayTopK]] = {}
        self.tp_rank, self.tp_size, self.sequence_parallel = tp_rank, tp_size, sequence_parallel
        for chunk in chunks:
            hooks = []
            for layer, moe in moe_layers([chunk]):
                hook = ReplayTopK(ordinal[layer], replay)
                moe.router.router_replay = hook
                hooks.append(hook)
            self.by_chunk[id(unwrap(chunk))] = hooks

    @property
    def hooks(self) -> list[ReplayTopK]:
        return [h for hooks in self.by_chunk.values() for h in hooks]

    def begin_pass(self) -> None:
        """Before a schedule (a forward-only pass, or one update): no recompute left queued."""
        for hook in self.hooks:
            hook.replay_backward_list = []
            hook.target_topk_idx = None

    def start_measuring(self) -> None:
        """Count where the routers' own top-k differs from the engine's, until take_mismatch."""
        for hook in self.hooks:
            hook.measuring = True

    def feed(self, model, routed_experts: Optional[torch.Tensor]) -> None:
        """Right before `model` (one chunk) runs a micro-batch: its routers' targets from the
        micro-batch's experts [b, s, MoE layers, k] (-1: none), laid out as megatron's router sees
        the tokens: [s, b] flattened, this rank's sequence shard under sequence parallelism."""
        hooks = self.by_chunk.get(id(unwrap(model)), [])
        if routed_experts is None:
            for hook in hooks:
                hook.target_topk_idx = None
            return
        per_token = routed_experts.transpose(0, 1)  # [s, b, layers, k]
        if self.sequence_parallel and self.tp_size > 1:
            shard = per_token.shape[0] // self.tp_size
            per_token = per_token[self.tp_rank * shard : (self.tp_rank + 1) * shard]
        for hook in hooks:
            hook.target_topk_idx = per_token[:, :, hook.ordinal].reshape(-1, per_token.shape[-1]).long()

    def take_mismatch(self, device: torch.device) -> dict:
        """routing_mismatch_frac over the pass just measured, summed over every rank (a collective
        over the world: each stage holds its own layers; TP ranks without sequence parallelism
        count the same tokens, which scales both sums alike); {} when nothing was compared."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for hook in self.hooks:
            sums += torch.stack([hook.mismatched.to(device), hook.compared.to(device)])
            hook.mismatched = torch.zeros((), dtype=torch.float64)
            hook.compared = torch.zeros((), dtype=torch.float64)
            hook.measuring = False
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        mismatched, compared = sums.tolist()
        return {"routing_mismatch_frac": mismatched / compared} if compared else {}


def check_routed_experts(
    rollouts, num_moe_layers: int, top_k: int, num_experts: int, *, required: bool, step=None
) -> None:
    """Host-side check, once per batch: every rollout's routing has one row per token the engine
    fed, its layers and top-k, experts in range; `required` (replay on): every rollout has one."""
    where = f"step {step}: " if step is not None else ""
    missing = [i for i, r in enumerate(rollouts) if r.routed_experts is None]
    if required and missing:
        raise ValueError(
            f"{where}actor.routing_replay=rollout needs the engine's routed experts of every rollout; "
            f"{len(missing)} of {len(rollouts)} lack them (e.g. rollout {missing[0]}, group "
            f"{rollouts[missing[0]].group})"
        )
    for i, r in enumerate(rollouts):
        experts = r.routed_experts
        if experts is None:
            continue
        rows = r.num_tokens - 1
        if tuple(experts.shape) != (rows, num_moe_layers, top_k):
            raise ValueError(
                f"{where}rollout {i} (group {r.group}) carries routed experts of shape "
                f"{tuple(experts.shape)}; expected ({rows}, {num_moe_layers}, {top_k}) (prompt + response "
                "- 1 tokens, MoE layers, top-k)"
            )
        if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
            raise ValueError(f"{where}rollout {i} (group {r.group}) routes to experts outside [0, {num_experts})")
