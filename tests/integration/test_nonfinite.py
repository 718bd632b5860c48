"""A NaN or inf loss or gradient skips that update, leaving weights, Adam state and the lr schedule
as they were, with the same verdict on every rank; actor.max_consecutive_skips in a row stop the run
with an error naming the step. Injected for real: NaN engine log-probs (the old policy of the loss)
and an inf gradient on one tensor-parallel rank only."""

import pytest
import torch
from multiprocess import run_processes
from tiny_actor import TINY, tiny_rollouts

pytestmark = [pytest.mark.distributed]


def _rollouts(poison: bool = False):
    return tiny_rollouts(engine_logprobs=True, nan_at=(2, 1, 1) if poison else None)


def _state(actor):
    from real_megatron.actor.weights import unwrap

    params = {n: p.detach().clone() for c in actor.chunks for n, p in unwrap(c).named_parameters()}
    adam = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
        for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
        for st in opt.optimizer.state.values()
    ]
    return params, adam, actor.scheduler.num_steps, actor.optimizer_steps


def _same(a, b) -> bool:
    params_a, adam_a, sched_a, steps_a = a
    params_b, adam_b, sched_b, steps_b = b
    return (
        sched_a == sched_b
        and steps_a == steps_b
        and params_a.keys() == params_b.keys()
        and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
        and len(adam_a) == len(adam_b)
        and all(
            x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
            for x, y in zip(adam_a, adam_b)
        )
    )


def _body(rank, world_size):
    from real_megatron.actor.actor import Actor, ActorSettings, NonFiniteUpdates
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict, unwrap
    from real_megatron.config import AlgorithmConfig, OptimConfig, ParallelConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(tp=2, timeout_s=60)
    spec = ArchSpec.from_hf(TINY)
    settings = ActorSettings(
        parallel=ParallelConfig(tp=2, gpus_per_node=2),
        groups_per_mini_batch=4,
        actor=ActorConfig(prompts_per_micro_batch=2, max_consecutive_skips=3),
        use_engine_logprobs=True,
        optim=OptimConfig(lr=1e-3, clip_grad=1.0),
    )
    actor = Actor(
        spec,
        settings,
        objective_from_config(AlgorithmConfig(name="real")),
        init_hf_state_dict(spec, seed=0).__getitem__,
    )

    first = actor.train_step(_rollouts(), step=1)  # a normal update: Adam state exists from here on
    assert first["skipped_updates"] == 0 and actor.optimizer_steps == 1
    before = _state(actor)

    # a NaN old log-prob in one rollout: non-finite loss and gradients, skipped
    metrics = actor.train_step(_rollouts(poison=True), step=2)
    assert metrics["skipped_updates"] == 1 and actor.consecutive_skips == 1, (metrics, actor.consecutive_skips)
    assert _same(before, _state(actor)), "a skipped update changed the weights or the optimizer"

    # an inf gradient on tensor-parallel rank 1 only, the loss finite: both ranks skip
    fc2 = next(p for n, p in unwrap(actor.chunks[0]).named_parameters() if n.endswith("linear_fc2.weight"))
    hook = fc2.register_hook(lambda g: g * float("inf")) if rank == 1 else None
    metrics = actor.train_step(_rollouts(), step=3)
    assert metrics["skipped_updates"] == 1 and actor.consecutive_skips == 2
    assert _same(before, _state(actor)), f"rank {rank} stepped although rank 1's gradient was inf"
    if hook is not None:
        hook.remove()

    metrics = actor.train_step(_rollouts(), step=4)  # healthy again: it steps, the count restarts
    assert metrics["skipped_updates"] == 0 and actor.consecutive_skips == 0 and actor.optimizer_steps == 2
    assert not _same(before, _state(actor))

    for step in (5, 6):
        actor.train_step(_rollouts(poison=True), step=step)
    with pytest.raises(
        NonFiniteUpdates,
        match=r"step 7, update 1 of 1, mini-batch 1 of 1: 3 updates in a row "
        r"skipped \(actor.max_consecutive_skips=3\); the last had a non-finite loss",
    ):
        actor.train_step(_rollouts(poison=True), step=7)


def test_non_finite_updates_are_skipped_on_every_rank_then_stop_the_run():
    run_processes(_body, 2)


@pytest.mark.parametrize("variant", ["real", "no_anchor", "bce"])
@pytest.mark.parametrize("skip_uniform", [False, True])
def test_a_nan_score_reaches_the_loss_instead_of_vanishing(variant, skip_uniform):
    """The group log-sum-exp used to turn a NaN into -inf (an 'empty' side), so a NaN rollout
    silently left the loss; the skip then never happened."""
    from real_megatron.kernels import group_logsumexp
    from real_megatron.objectives import real_loss, real_loss_across_ranks
    from real_megatron.objectives.segments import segment_logsumexp

    scores = torch.tensor([0.1, float("nan"), 0.2, -0.3, 0.5, 0.4])
    labels, groups = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 0, 1, 1])
    assert torch.isnan(real_loss(scores, labels, groups, variant=variant, skip_uniform_groups=skip_uniform))
    across = real_loss_across_ranks(scores, labels, groups, 2, variant=variant, skip_uniform_groups=skip_uniform)
    assert torch.isnan(across), across
    lse = group_logsumexp(scores, groups, 3)
    assert torch.isnan(lse[0]) and torch.isfinite(lse[1]) and lse[2] == float("-inf")  # empty group: still -inf
    seg = segment_logsumexp(scores, groups, 3)
    assert torch.isnan(seg[0]) and seg[2] == float("-inf")
