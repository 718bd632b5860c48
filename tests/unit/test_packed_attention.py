"""The local spec's attention kernel (actor/attention_batches.py): exact block-diagonal causal
attention over a packed row, and memory that grows linearly with the rollouts' length on CPU."""

import math

import pytest
import torch

from real_megatron.actor.attention_batches import packed_causal_attention, plan


def _bounds(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return tuple(bounds)


def _reference(q, k, v, bounds, scale):
    """Each segment alone, scores and probabilities materialised (what megatron's local
    DotProductAttention computes)."""
    out = []
    repeat = q.shape[1] // k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        kk, vv = k[s:e].repeat_interleave(repeat, 1), v[s:e].repeat_interleave(repeat, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e], kk) * scale
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).flatten(1))
    return torch.cat(out)


def _inputs(total, heads=4, groups=2, dim=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, n, dim, dtype=dtype, generator=gen).requires_grad_() for n in (heads, groups, groups)]


@pytest.mark.parametrize("lengths", [[37, 5, 64, 3, 40, 1, 7, 2], [50]])
def test_packed_attention_matches_each_sequence_alone_forward_and_backward(lengths):
    bounds = _bounds(lengths)  # a long tail (batches gathered and padded to their longest), or one rollout (a slice)
    groups, _ = plan(bounds, torch.device("cpu"))
    assert len(groups) == (3 if len(lengths) > 1 else 1) and (groups[0].index is None) == (len(lengths) == 1)
    q, k, v = _inputs(bounds[-1])
    out = packed_causal_attention(q, k, v, bounds, scale=0.3)
    ref = _reference(q, k, v, bounds, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    for got, want in zip(
        torch.autograd.grad((out * weight).sum(), (q, k, v)), torch.autograd.grad((ref * weight).sum(), (q, k, v))
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens end at 10 but the packed row holds"):
        packed_causal_attention(q, k, v, (0, 10), scale=0.3)


def _peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once while `fn` ran (its allocations and frees,
    recorded by the profiler), inputs made before it left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_attention_memory_grows_linearly_with_rollout_length_on_cpu():
    """Forward and backward over one packed row of rollouts [L, L - 3, L / 2, 7] in fp32: 4x the
    length takes ~4x the memory (the kernel never holds [L, L] scores); megatron's way (scores and
    probabilities of every head kept for backward) takes ~16x, which the measure sees."""

    def step(length, kernel):
        bounds = _bounds([length, length - 3, length // 2, 7])
        q, k, v = _inputs(bounds[-1], heads=4, groups=2, dim=32, dtype=torch.float32)
        grad = torch.ones(bounds[-1], 4 * 32)
        return _peak_bytes(lambda: kernel(q, k, v, bounds, scale=0.2).backward(grad))

    fused = {n: step(n, packed_causal_attention) for n in (512, 2048)}
    assert fused[2048] <= 4.6 * fused[512], fused
    assert fused[2048] < 2048**2 * 4 * 4, fused  # below one layer's fp32 scores of its 4 heads
    naive = {n: step(n, lambda q, k, v, b, scale: _reference(q, k, v, b, scale)) for n in (512, 2048)}
    assert naive[2048] >= 10 * naive[512], naive
