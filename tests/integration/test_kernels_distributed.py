"""Kernels over 2 gloo processes: TP=2 vocab shards and DP=2 split groups equal one process."""

import pytest
import torch
import torch.distributed as dist
from kernel_reference import rel_err
from multiprocess import run_processes

pytestmark = pytest.mark.distributed


def _tp_token_logprobs(rank, world, impl):
    from real_megatron.kernels import linear_token_logprobs, token_logprobs

    gen = torch.Generator().manual_seed(0)  # same full inputs on both ranks
    T, H, V = 11, 16, 2 * 1037  # shard of 1037: not a multiple of the block size
    logits = torch.randn(T, V, generator=gen) * 3
    hidden, weight = torch.randn(T, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5
    targets = torch.randint(0, V, (T,), generator=gen)
    targets[:2] = torch.tensor([5, V - 3])  # one target in each shard for sure
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    shard = slice(rank * V // 2, (rank + 1) * V // 2)

    def run(fn, *inputs, **kw):
        inputs = [x.clone().requires_grad_(True) for x in inputs]
        lp, ent = fn(*inputs, targets, return_entropy=True, impl=impl, **kw)
        grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), inputs)
        return lp.detach(), ent.detach(), grads

    lp1, ent1, (g1,) = run(token_logprobs, logits)  # single-process reference on the full vocabulary
    lp2, ent2, (g2,) = run(token_logprobs, logits[:, shard], tp_group=dist.group.WORLD)
    assert rel_err(lp2, lp1) <= 1e-6 and rel_err(ent2, ent1) <= 1e-6
    assert rel_err(g2, g1[:, shard]) <= 1e-6
    others = [torch.empty_like(lp2) for _ in range(world)]
    dist.all_gather(others, lp2)
    assert all(torch.equal(o, lp2) for o in others)  # identical on every TP rank

    lp1, ent1, (gh1, gw1) = run(linear_token_logprobs, hidden, weight, chunk_tokens=4)
    lp2, ent2, (gh2, gw2) = run(linear_token_logprobs, hidden, weight[shard], chunk_tokens=4, tp_group=dist.group.WORLD)
    assert rel_err(lp2, lp1) <= 1e-6 and rel_err(ent2, ent1) <= 1e-6
    # summed over the TP group in backward: float32 sums in another order, so the fp32 bound
    assert rel_err(gh2, gh1) <= 1e-5, rel_err(gh2, gh1)
    assert rel_err(gw2, gw1[shard]) <= 1e-6


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tensor_parallel_vocab_shards_equal_one_process(impl):
    run_processes(_tp_token_logprobs, 2, impl)


def _split_batch(num_groups=7, seed=1):
    """A batch of groups of different sizes with mixed labels, and a random rank for each rollout."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (num_groups,), generator=gen)
    group = torch.repeat_interleave(torch.arange(num_groups), sizes)
    n = len(group)
    scores = torch.randn(n, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=gen)
    owner = torch.randint(0, 2, (n,), generator=gen)
    owner[:2] = torch.tensor([0, 1])
    return scores, labels, group, owner


def _dp_group_logsumexp(rank, world, impl):
    from real_megatron.kernels import group_logsumexp
    from real_megatron.objectives import real_loss, real_loss_across_ranks

    scores, labels, group, owner = _split_batch()
    G = int(group.max()) + 2  # one empty group at the end
    mine = owner == rank

    full = scores.clone().requires_grad_(True)
    ref = group_logsumexp(full, group, G, impl="torch")
    upstream = torch.linspace(-1, 1, G, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), full)

    local = scores[mine].clone().requires_grad_(True)
    lse = group_logsumexp(local, group[mine], G, dp_group=dist.group.WORLD, impl=impl)
    assert torch.isinf(lse[-1]) and rel_err(lse[:-1], ref[:-1]) <= 1e-6
    (grad,) = torch.autograd.grad((lse * upstream.to(lse.dtype)).sum(), local)
    assert torch.isfinite(grad).all() and rel_err(grad, ref_grad[mine]) <= 1e-6

    # REAL on groups split over the two ranks equals real_loss on the gathered batch
    for variant in ("real", "no_anchor", "bce"):
        for skip in (False, True):
            full = scores.clone().requires_grad_(True)
            expect = real_loss(full, labels, group, tau=0.5, variant=variant, skip_uniform_groups=skip)
            (expect_grad,) = torch.autograd.grad(expect, full)
            local = scores[mine].clone().requires_grad_(True)
            loss = real_loss_across_ranks(
                local,
                labels[mine],
                group[mine],
                G,
                tau=0.5,
                variant=variant,
                skip_uniform_groups=skip,
                dp_group=dist.group.WORLD,
                impl=impl,
            )
            (grad,) = torch.autograd.grad(loss, local)
            assert rel_err(loss, expect) <= 1e-6, (variant, skip, loss.item(), expect.item())
            assert rel_err(grad, expect_grad[mine]) <= 1e-6, (variant, skip)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_data_parallel_split_groups_equal_one_process(impl):
    run_processes(_dp_group_logsumexp, 2, impl)
