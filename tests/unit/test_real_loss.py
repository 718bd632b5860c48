"""REAL and its variants: closed-form gradients (Eq. 9/10), bounds, invariances, extremes, gradcheck."""

import math

import pytest
import torch

from real_megatron.objectives import real_loss, sequence_scores

VARIANTS = ["real", "no_anchor", "bce"]


def random_batch(gen, num_groups=6, max_size=9, dtype=torch.float64, scale=2.0):
    sizes = torch.randint(1, max_size + 1, (num_groups,), generator=gen)
    ids = torch.repeat_interleave(torch.randperm(1000, generator=gen)[:num_groups] - 500, sizes)
    labels = torch.randint(0, 2, (int(sizes.sum()),), generator=gen)
    scores = (torch.randn(int(sizes.sum()), generator=gen, dtype=dtype) * scale).requires_grad_(True)
    return scores, labels, ids


def reference_loss(scores, labels, ids, tau, variant, skip):
    """Per-group formulas of the paper written out with Python loops in float64."""
    total = 0.0
    for g in sorted(set(ids.tolist())):
        members = [i for i in range(len(ids)) if ids[i] == g]
        pos = [float(scores[i].detach()) for i in members if labels[i] == 1]
        neg = [float(scores[i].detach()) for i in members if labels[i] == 0]
        if skip and (not pos or not neg):
            continue
        if variant == "real":
            total += math.log(1 + sum(math.exp(-s / tau) for s in pos)) + math.log(
                1 + sum(math.exp(s / tau) for s in neg)
            )
        elif variant == "no_anchor":
            total += math.log(1 + sum(math.exp((sj - si) / tau) for si in pos for sj in neg))
        else:
            total += sum(math.log1p(math.exp(-s / tau)) for s in pos)  # -log sigmoid(s/tau)
            total += sum(math.log1p(math.exp(s / tau)) for s in neg)  # -log(1 - sigmoid(s/tau))
    return total


def closed_form_grad(scores, labels, ids, tau, variant, skip):
    """Eq. 9/10 for REAL: dL/ds_i = -(1/tau) C+_i for positives, +(1/tau) C-_j for negatives."""
    s = scores.detach().double()
    grad = torch.zeros_like(s)
    for g in set(ids.tolist()):
        members = (ids == g).nonzero().flatten().tolist()
        pos = [i for i in members if labels[i] == 1]
        neg = [i for i in members if labels[i] == 0]
        if skip and (not pos or not neg):
            continue
        if variant == "real":
            zp = 1 + sum(math.exp(-s[i] / tau) for i in pos)
            zn = 1 + sum(math.exp(s[j] / tau) for j in neg)
            for i in pos:
                grad[i] = -math.exp(-s[i] / tau) / zp / tau  # C+_i = softmax weight against the anchor
            for j in neg:
                grad[j] = math.exp(s[j] / tau) / zn / tau
        elif variant == "no_anchor":
            z = 1 + sum(math.exp((s[j] - s[i]) / tau) for i in pos for j in neg)
            for i in pos:
                grad[i] = -sum(math.exp((s[j] - s[i]) / tau) for j in neg) / z / tau
            for j in neg:
                grad[j] = sum(math.exp((s[j] - s[i]) / tau) for i in pos) / z / tau
        else:
            for i in pos:
                grad[i] = -torch.sigmoid(-s[i] / tau) / tau
            for j in neg:
                grad[j] = torch.sigmoid(s[j] / tau) / tau
    return grad


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("skip", [False, True])
def test_loss_and_gradient_match_closed_form(variant, skip):
    gen = torch.Generator().manual_seed(11)
    for trial in range(5):
        scores, labels, ids = random_batch(gen)
        tau = [0.5, 0.25, 1.0, 2.0, 0.1][trial]
        loss = real_loss(scores, labels, ids, tau=tau, variant=variant, skip_uniform_groups=skip)
        (grad,) = torch.autograd.grad(loss, scores)
        assert loss.item() == pytest.approx(reference_loss(scores, labels, ids, tau, variant, skip), rel=1e-12)
        torch.testing.assert_close(
            grad, closed_form_grad(scores, labels, ids, tau, variant, skip), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_bounded_by_inverse_tau(variant):
    gen = torch.Generator().manual_seed(3)
    for tau in (0.5, 0.1):
        scores, labels, ids = random_batch(gen, num_groups=20, max_size=16, scale=50.0)
        (grad,) = torch.autograd.grad(real_loss(scores, labels, ids, tau=tau, variant=variant), scores)
        assert grad.abs().max().item() <= 1 / tau * (1 + 1e-12)
        # and the sign follows the label: positives pulled up, negatives pushed down
        assert (grad[labels == 1] <= 0).all() and (grad[labels == 0] >= 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_monotonic_in_each_score(variant):
    gen = torch.Generator().manual_seed(5)
    scores, labels, ids = random_batch(gen, num_groups=4, max_size=6)
    # make every group mixed so every score matters (no_anchor ignores one-class groups)
    for g in set(ids.tolist()):
        members = (ids == g).nonzero().flatten()
        if len(members) == 1:
            labels[members[0]] = 1
        else:
            labels[members[0]], labels[members[1]] = 1, 0
    base = real_loss(scores.detach(), labels, ids, variant=variant).item()
    for i in range(len(scores)):
        for step in (1e-3, 0.5):
            moved = scores.detach().clone()
            moved[i] += step
            after = real_loss(moved, labels, ids, variant=variant).item()
            alone = ((ids == ids[i]).sum() == 1).item()
            if variant == "no_anchor" and alone:
                assert after == base
            elif labels[i] == 1:
                assert after < base
            else:
                assert after > base


@pytest.mark.parametrize("variant", VARIANTS)
def test_invariant_to_permutation_and_renaming(variant):
    gen = torch.Generator().manual_seed(7)
    scores, labels, ids = random_batch(gen, num_groups=8)
    loss = real_loss(scores, labels, ids, variant=variant, skip_uniform_groups=True)
    (grad,) = torch.autograd.grad(loss, scores)

    perm = torch.randperm(len(scores), generator=gen)
    renamed = {g: 10**9 - 7 * k for k, g in enumerate(sorted(set(ids.tolist()), reverse=True))}
    new_ids = torch.tensor([renamed[g] for g in ids[perm].tolist()])
    s2 = scores.detach()[perm].clone().requires_grad_(True)
    loss2 = real_loss(s2, labels[perm], new_ids, variant=variant, skip_uniform_groups=True)
    (grad2,) = torch.autograd.grad(loss2, s2)
    torch.testing.assert_close(loss2, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad2, grad[perm], rtol=1e-13, atol=0)


def test_hand_computed_cases():
    tau = 0.5
    zeros = torch.zeros(3, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0])
    ids = torch.tensor([4, 4, 4])
    # at s = 0 (the first update of a batch): log(1+2) + log(1+1), log(1 + 2*1), 3 log 2
    assert real_loss(zeros, labels, ids, tau=tau).item() == pytest.approx(math.log(6))
    assert real_loss(zeros, labels, ids, tau=tau, variant="no_anchor").item() == pytest.approx(math.log(3))
    assert real_loss(zeros, labels, ids, tau=tau, variant="bce").item() == pytest.approx(3 * math.log(2))
    # one positive at +0.5, one negative at -0.5: each side is log(1 + e^-1)
    s = torch.tensor([0.5, -0.5], dtype=torch.float64)
    one = torch.tensor([1, 0])
    assert real_loss(s, one, torch.tensor([0, 0]), tau=tau).item() == pytest.approx(2 * math.log1p(math.exp(-1)))
    assert real_loss(s, one, torch.tensor([0, 0]), tau=tau, variant="no_anchor").item() == pytest.approx(
        math.log1p(math.exp(-2))
    )
    # bool labels work like ints; two groups add up
    both = real_loss(
        torch.cat([zeros, s]), torch.tensor([True, True, False, True, False]), torch.tensor([1, 1, 1, 2, 2]), tau=tau
    )
    assert both.item() == pytest.approx(math.log(6) + 2 * math.log1p(math.exp(-1)))


def test_skip_uniform_groups_contribute_exactly_zero():
    s = torch.tensor([0.3, -1.0, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 1, 0, 0])
    ids = torch.tensor([0, 0, 1, 1])  # both groups uniform
    for variant in VARIANTS:
        loss = real_loss(s, labels, ids, variant=variant, skip_uniform_groups=True)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and (grad == 0).all()
        kept = real_loss(s, labels, ids, variant=variant)
        assert (kept.item() > 0) == (variant != "no_anchor")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scores_stay_finite(variant, dtype):
    tau = 0.5
    big = 1e4 * tau  # |s/tau| = 1e4
    s = torch.tensor([big, -big, big, -big, 0.0, big, -big], dtype=dtype, requires_grad=True)
    labels = torch.tensor([1, 1, 0, 0, 1, 1, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    loss = real_loss(s, labels, ids, tau=tau, variant=variant)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.abs().max() <= 1 / tau * (1 + 1e-6)
    # the badly scored positive (-big) and negative (+big) drive the loss: about 1e4 each
    assert loss.item() > 1e4
    if variant == "real":
        assert grad[1].item() == pytest.approx(-1 / tau) and grad[2].item() == pytest.approx(1 / tau)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_gradcheck(variant):
    gen = torch.Generator().manual_seed(13)
    scores, labels, ids = random_batch(gen, num_groups=5, max_size=5, scale=1.0)
    for skip in (False, True):
        assert torch.autograd.gradcheck(
            lambda s, skip=skip: real_loss(s, labels, ids, tau=0.5, variant=variant, skip_uniform_groups=skip),
            (scores,),
        )


def test_groups_of_size_one_and_empty_input():
    s = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    loss = real_loss(s, torch.tensor([1, 0]), torch.tensor([3, 9]), tau=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-0.4)))
    empty = real_loss(
        torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    assert empty.item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(17)
    scores, labels, ids = random_batch(gen, dtype=torch.float32)
    for variant in VARIANTS:
        cpu = real_loss(scores, labels, ids, variant=variant)
        gpu = real_loss(scores.detach().cuda(), labels.cuda(), ids.cuda(), variant=variant)
        torch.testing.assert_close(gpu.cpu(), cpu.detach())


def test_bad_inputs_are_named():
    s = torch.zeros(3)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        real_loss(s, torch.tensor([0, 2, 1]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown REAL variant"):
        real_loss(s, torch.zeros(3), torch.zeros(3, dtype=torch.long), variant="reall")
    with pytest.raises(ValueError, match="one shape"):
        real_loss(s, torch.zeros(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tau"):
        real_loss(s, torch.zeros(3), torch.zeros(3, dtype=torch.long), tau=0.0)


# --- sequence_scores ---------------------------------------------------------------------------------


def test_sequence_scores_is_masked_mean_of_log_ratio():
    gen = torch.Generator().manual_seed(19)
    lengths = [5, 1, 7, 3]
    seq_index = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    T = len(seq_index)
    lp = torch.randn(T, generator=gen, dtype=torch.float64, requires_grad=True)
    old = torch.randn(T, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(T, generator=gen) > 0.3
    mask[seq_index == 1] = False  # a sequence with no response tokens
    scores = sequence_scores(lp, old, mask, seq_index)
    for n in range(4):
        sel = (seq_index == n) & mask
        expect = (lp[sel] - old[sel]).mean().item() if sel.any() else 0.0
        assert scores[n].item() == pytest.approx(expect, rel=1e-12, abs=1e-15)
    scores.sum().backward()
    assert old.grad is None  # pi_old is a constant
    assert (lp.grad[~mask] == 0).all()
    for n in range(4):
        sel = (seq_index == n) & mask
        if sel.any():
            torch.testing.assert_close(
                lp.grad[sel], torch.full((int(sel.sum()),), 1.0 / int(sel.sum()), dtype=torch.float64)
            )


def test_sequence_scores_zero_at_old_policy_and_packed_any_order():
    seq_index = torch.tensor([2, 0, 0, 1, 2, 1, 2])
    lp = torch.randn(7)
    s = sequence_scores(lp, lp.clone(), torch.ones(7), seq_index)
    assert s.shape == (3,) and (s == 0).all()
    s = sequence_scores(lp, torch.zeros(7), torch.ones(7), seq_index, num_sequences=5)
    assert s.shape == (5,) and s[3] == 0 and s[4] == 0
    assert s[2].item() == pytest.approx(lp[[0, 4, 6]].mean().item())
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        sequence_scores(lp, lp[:3], torch.ones(7), seq_index)


def test_bf16_logprobs_give_fp32_scores():
    lp = torch.randn(6).bfloat16()
    s = sequence_scores(lp, torch.zeros(6, dtype=torch.bfloat16), torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert s.dtype == torch.float32
