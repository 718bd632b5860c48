"""Baselines (GRPO, DAPO, GSPO), KL options and the registry, against loop-written references."""

import math

import pytest
import torch

from real_megatron.config import AlgorithmConfig
from real_megatron.objectives import (
    OBJECTIVES,
    PolicyBatch,
    build_objective,
    group_advantages,
    k3_kl,
    normalise,
    objective_from_config,
    real_loss,
    sequence_scores,
)


def make_batch(gen, num_groups=4, group_size=4, dtype=torch.float64, spread=0.3):
    """Packed micro-batch: groups of `group_size` rollouts with random lengths and mixed rewards."""
    n = num_groups * group_size
    lengths = torch.randint(1, 8, (n,), generator=gen)
    seq_index = torch.repeat_interleave(torch.arange(n), lengths)
    T = len(seq_index)
    old = -torch.rand(T, generator=gen, dtype=dtype) * 3
    lp = (old + torch.randn(T, generator=gen, dtype=dtype) * spread).requires_grad_(True)
    mask = torch.rand(T, generator=gen) > 0.2
    rewards = torch.randint(0, 2, (n,), generator=gen)
    group_ids = torch.arange(num_groups).repeat_interleave(group_size) * 10 + 3
    return PolicyBatch(lp, old, mask, seq_index, rewards, group_ids, ref_logprobs=old - 0.1)


def reference_advantages(rewards, group_ids):
    adv = torch.zeros(len(rewards), dtype=torch.float64)
    for g in set(group_ids.tolist()):
        sel = group_ids == g
        r = rewards[sel].double()
        adv[sel] = 0.0 if len(r) == 1 else (r - r.mean()) / (r.std() + 1e-6)
    return adv


def reference_clip_loss(b: PolicyBatch, kind, lo, hi):
    """Loops over sequences and tokens, as the GRPO / DAPO / GSPO papers write the objectives."""
    adv = reference_advantages(b.rewards, b.group_ids)
    total = 0.0
    for n in range(b.num_sequences):
        sel = (b.seq_index == n) & b.loss_mask
        if not sel.any():
            continue
        log_ratio = b.logprobs[sel] - b.old_logprobs[sel]
        if kind == "gspo":
            r = torch.exp(log_ratio.mean())
            total = total - torch.minimum(r * adv[n], r.clamp(1 - lo, 1 + hi) * adv[n])
            continue
        r = torch.exp(log_ratio)
        per_token = -torch.minimum(r * adv[n], r.clamp(1 - lo, 1 + hi) * adv[n])
        total = total + (per_token.sum() if kind == "dapo" else per_token.mean())
    return total


def test_group_advantages():
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1])
    ids = torch.tensor([0, 0, 0, 0, 7, 7, 5, 9])
    adv = group_advantages(rewards, ids)
    std = math.sqrt(0.25)  # unbiased std of [1,0,0,0] = sqrt(0.75 / 3)
    assert adv[0].item() == pytest.approx(0.75 / (std + 1e-6))
    assert adv[1].item() == pytest.approx(-0.25 / (std + 1e-6))
    assert adv[4:6].abs().max() == 0  # uniform group
    assert adv[6] == 0 and adv[7] == 0  # groups of one rollout
    torch.testing.assert_close(adv.double(), reference_advantages(rewards, ids))


@pytest.mark.parametrize("kind,lo,hi", [("grpo", 0.2, 0.2), ("dapo", 0.2, 0.28), ("gspo", 3e-4, 4e-4)])
def test_clip_objectives_match_reference(kind, lo, hi):
    gen = torch.Generator().manual_seed(23)
    obj = build_objective(kind)
    assert (obj.clip_low, obj.clip_high) == (lo, hi)  # the published defaults
    for spread in (0.0, 0.05, 0.5):  # at the old policy, inside and far outside the clip range
        b = make_batch(gen, spread=spread)
        terms = obj(b)
        assert list(terms) == (["tokens"] if kind == "dapo" else ["sequences"])
        loss = next(iter(terms.values()))
        (grad,) = torch.autograd.grad(loss, b.logprobs)
        ref = reference_clip_loss(b, kind, lo, hi)
        (ref_grad,) = torch.autograd.grad(ref, b.logprobs)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    # one group of two one-token rollouts: rewards 1 (A > 0) and 0 (A < 0)
    old = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    lp = (old + torch.tensor([0.5, -0.5], dtype=torch.float64)).requires_grad_(True)  # ratio e^0.5, e^-0.5
    b = PolicyBatch(lp, old, torch.ones(2, dtype=torch.bool), torch.arange(2), torch.tensor([1, 0]), torch.zeros(2))
    (grad,) = torch.autograd.grad(build_objective("grpo")(b)["sequences"], lp)
    assert (grad == 0).all()  # A>0 with ratio > 1.2 and A<0 with ratio < 0.8 are both clipped
    lp2 = (old + torch.tensor([-0.5, 0.5], dtype=torch.float64)).requires_grad_(True)  # moving the wrong way
    b2 = PolicyBatch(lp2, old, torch.ones(2, dtype=torch.bool), torch.arange(2), torch.tensor([1, 0]), torch.zeros(2))
    (grad2,) = torch.autograd.grad(build_objective("grpo")(b2)["sequences"], lp2)
    assert grad2[0] < 0 and grad2[1] > 0  # unclipped: pull the positive up, the negative down


@pytest.mark.parametrize("name", ["real", "real_no_anchor", "real_bce"])
def test_real_objectives_route_through_real_loss(name):
    gen = torch.Generator().manual_seed(29)
    b = make_batch(gen)
    terms = build_objective(name, tau=0.25, skip_uniform_groups=True)(b)
    scores = sequence_scores(b.logprobs, b.old_logprobs, b.loss_mask, b.seq_index)
    variant = {"real": "real", "real_no_anchor": "no_anchor", "real_bce": "bce"}[name]
    expect = real_loss(scores, b.rewards, b.group_ids, tau=0.25, variant=variant, skip_uniform_groups=True)
    # REAL-BCE is divided by the rollouts of informative groups (the paper's code), the others by prompts
    unit = "informative_sequences" if name == "real_bce" else "groups"
    assert list(terms) == [unit]
    torch.testing.assert_close(terms[unit], expect)


def test_kl_options():
    gen = torch.Generator().manual_seed(31)
    b = make_batch(gen, spread=0.2)
    plain = build_objective("real")(b)["groups"]
    # kl to the old policy: k3 per token, token mean per sequence, summed over sequences
    with_old = build_objective("real", kl="old", kl_coef=0.1)(b)
    assert with_old["groups"].item() == pytest.approx(plain.item())
    expect = sum(
        k3_kl(b.logprobs[(b.seq_index == n) & b.loss_mask], b.old_logprobs[(b.seq_index == n) & b.loss_mask]).mean()
        for n in range(b.num_sequences)
        if ((b.seq_index == n) & b.loss_mask).any()
    )
    assert with_old["sequences"].item() == pytest.approx(0.1 * expect.item(), rel=1e-10)
    with_ref = build_objective("grpo", kl="reference", kl_coef=0.04)(b)
    assert with_ref["sequences"].item() != pytest.approx(build_objective("grpo")(b)["sequences"].item())
    # k3 is >= 0 and 0 exactly at the target
    same = PolicyBatch(
        b.old_logprobs.clone().requires_grad_(True), b.old_logprobs, b.loss_mask, b.seq_index, b.rewards, b.group_ids
    )
    assert build_objective("real", kl="old", kl_coef=1.0)(same)["sequences"].item() == 0.0
    assert (k3_kl(b.logprobs, b.ref_logprobs) >= 0).all()
    no_ref = PolicyBatch(b.logprobs, b.old_logprobs, b.loss_mask, b.seq_index, b.rewards, b.group_ids)
    with pytest.raises(ValueError, match="ref_logprobs"):
        build_objective("real", kl="reference", kl_coef=0.1)(no_ref)


def test_registry_names_and_errors():
    assert set(OBJECTIVES) == {"real", "real_no_anchor", "real_bce", "grpo", "dapo", "gspo"}
    for name in OBJECTIVES:
        assert build_objective(name).name == name
    with pytest.raises(ValueError, match="registered: real"):
        build_objective("ppo")
    cfg = AlgorithmConfig(name="dapo", clip_high=0.3)
    obj = objective_from_config(cfg)
    assert (obj.clip_low, obj.clip_high) == (0.2, 0.3)


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_normalised_gradient_independent_of_micro_batch_split(name, correction):
    """Whole groups split over micro-batches: summed terms / global counts == one big batch, with
    importance correction and rollouts out of the loss (algorithm.truncated=exclude)."""
    gen = torch.Generator().manual_seed(37)
    b = make_batch(gen, num_groups=6, group_size=4, spread=0.2)
    b.engine_logprobs = b.old_logprobs + torch.randn(b.old_logprobs.shape, generator=gen, dtype=torch.float64) * 0.5
    b.active = torch.rand(b.num_sequences, generator=gen) > 0.25
    obj = build_objective(name, kl="old", kl_coef=0.05, importance_correction=correction, is_cap=1.5)
    in_loss = b.active[b.seq_index] & b.loss_mask
    labels = {}
    for n in range(b.num_sequences):
        if b.active[n]:
            labels.setdefault(int(b.group_ids[n]), set()).add(int(b.rewards[n]))
    informative = sum(bool(b.active[n]) and len(labels[int(b.group_ids[n])]) == 2 for n in range(b.num_sequences))
    counts = {
        "groups": 6,
        "sequences": int(b.active.sum()),
        "tokens": int(in_loss.sum()),
        "informative_sequences": informative,
    }
    adv = torch.zeros(b.num_sequences, dtype=torch.float64)  # the trainer computes these once per rollout batch
    adv[b.active] = group_advantages(b.rewards[b.active], b.group_ids[b.active])
    b.advantages = adv
    (full,) = torch.autograd.grad(normalise(obj(b), counts), b.logprobs)
    assert full.abs().sum() > 0
    assert (full[~in_loss] == 0).all()  # nothing of an excluded rollout reaches the gradient

    grad = torch.zeros_like(b.logprobs)
    for seqs in ([0, 1, 2, 3, 12, 13, 14, 15], list(range(4, 12)) + list(range(16, 24))):  # groups {0,3}, {1,2,4,5}
        seqs_t = torch.tensor(seqs)
        token_sel = torch.isin(b.seq_index, seqs_t)
        remap = torch.full((b.num_sequences,), -1, dtype=torch.long)
        remap[seqs_t] = torch.arange(len(seqs))
        lp = b.logprobs.detach()[token_sel].clone().requires_grad_(True)
        part = PolicyBatch(
            lp,
            b.old_logprobs[token_sel],
            b.loss_mask[token_sel],
            remap[b.seq_index[token_sel]],
            b.rewards[seqs_t],
            b.group_ids[seqs_t],
            advantages=adv[seqs_t],
            engine_logprobs=b.engine_logprobs[token_sel],
            active=b.active[seqs_t],
        )
        (g,) = torch.autograd.grad(normalise(obj(part), counts), lp)
        grad[token_sel] += g
    torch.testing.assert_close(grad, full, rtol=1e-12, atol=1e-15)


def test_normalise_needs_counts():
    with pytest.raises(ValueError, match="tokens"):
        normalise({"tokens": torch.tensor(1.0)}, {"groups": 3})
    # a unit counted 0 times (no informative group in the mini-batch) adds 0, not NaN
    x = torch.tensor(0.0, requires_grad=True)
    loss = normalise({"informative_sequences": x * 2, "groups": x + 1}, {"informative_sequences": 0, "groups": 4})
    assert loss.item() == 0.25
    (g,) = torch.autograd.grad(loss, x)
    assert g.item() == 0.25
