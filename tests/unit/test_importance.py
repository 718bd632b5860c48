"""Train-inference mismatch: its metrics and the importance corrections (TIS, MIS) of every
objective, against hand-computed cases; REAL-BCE's normalisation against the paper's code."""

import math

import pytest
import torch
import torch.nn.functional as F

from real_megatron.config import ConfigError, load_config
from real_megatron.objectives import PolicyBatch, build_objective, normalise, real_loss, real_loss_across_ranks
from real_megatron.objectives.importance import (
    mismatch_partials,
    sequence_importance_weights,
    token_importance_weights,
)

D = torch.float64


def test_token_and_sequence_weights_by_hand():
    ratios = torch.tensor([3.0, 0.4, 1.0, 1.5, 1.99, 0.51], dtype=D)
    engine = torch.full((6,), -2.0, dtype=D)
    old = engine + ratios.log()
    tis = token_importance_weights(old, engine, mode="tis", cap=2.0)
    mis = token_importance_weights(old, engine, mode="mis", cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([2.0, 0.4, 1.0, 1.5, 1.99, 0.51], dtype=D))  # min(r, C)
    torch.testing.assert_close(mis, torch.tensor([0.0, 0.0, 1.0, 1.5, 1.99, 0.51], dtype=D))  # r inside [1/C, C]
    # per sequence: the length-normalised ratio exp(mean log r); masked tokens do not count
    seq = torch.tensor([0, 0, 1, 1, 2, 2])
    mask = torch.tensor([True, True, True, False, True, True])
    old_s = engine + torch.tensor([3.24, 1.0, 9.0, 100.0, 0.36, 1.0], dtype=D).log()
    for mode, expect in (("tis", [1.8, 2.0, 0.6]), ("mis", [1.8, 0.0, 0.6])):  # r = 1.8, 9, 0.6
        got = sequence_importance_weights(old_s, engine, mask, seq, 3, mode=mode, cap=2.0)
        torch.testing.assert_close(got, torch.tensor(expect, dtype=D))


def test_mismatch_partials_by_hand():
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=D)
    engine = torch.tensor([-1.1, -2.0, -1.5], dtype=D)  # d = 0.1, 0, 1.0
    abs_sum, top, k3, above, n = mismatch_partials(old, engine, threshold=0.5).tolist()
    assert abs_sum == pytest.approx(1.1) and top == pytest.approx(1.0) and above == 1 and n == 3
    assert k3 == pytest.approx((math.exp(0.1) - 1 - 0.1) + (math.exp(1.0) - 1 - 1.0))
    assert mismatch_partials(old, old, 0.5).tolist() == [0.0, 0.0, 0.0, 0.0, 3.0]
    # an engine's -inf log-prob: k3 stays finite and >= 0
    _, _, k3, _, _ = mismatch_partials(old, torch.tensor([-1.0, float("-inf"), -0.5], dtype=D), 0.5).tolist()
    assert 0 <= k3 < math.inf


def one_sequence_batch(ratios_engine, advantage=1.0, correction="tis"):
    """One sequence whose pi_theta = pi_old, so the clipped surrogate is -A per token."""
    n = len(ratios_engine)
    old = torch.full((n,), -1.0, dtype=D)
    lp = old.clone().requires_grad_(True)
    engine = old - torch.tensor(ratios_engine, dtype=D).log()  # pi_old / pi_engine = the given ratios
    batch = PolicyBatch(
        lp,
        old,
        torch.ones(n, dtype=torch.bool),
        torch.zeros(n, dtype=torch.long),
        torch.tensor([1]),
        torch.tensor([0]),
        advantages=torch.tensor([advantage], dtype=D),
        engine_logprobs=engine,
    )
    return batch, lp


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
def test_grpo_and_dapo_weight_each_token(correction):
    ratios = [3.0, 1.5, 0.25, 1.0]  # C = 2: tis [2, 1.5, 0.25, 1], mis [0, 1.5, 0, 1]
    w = {"none": [1, 1, 1, 1], "tis": [2, 1.5, 0.25, 1], "mis": [0, 1.5, 0, 1]}[correction]
    for name, unit, divisor in (("grpo", "sequences", 4), ("dapo", "tokens", 1)):
        batch, lp = one_sequence_batch(ratios)
        terms = build_objective(name, importance_correction=correction, is_cap=2.0)(batch)
        assert list(terms) == [unit]
        # loss per token -w_t * ratio * A (unclipped at ratio 1): GRPO averages over the 4 tokens
        # (masked ones still count: the normaliser never changes), DAPO sums
        assert terms[unit].item() == pytest.approx(-sum(w) / divisor)
        (grad,) = torch.autograd.grad(terms[unit], lp)
        torch.testing.assert_close(grad, -torch.tensor(w, dtype=D) / divisor)


@pytest.mark.parametrize("correction,weight", [("none", 1.0), ("tis", 2.0), ("mis", 0.0), ("mis", 1.5)])
def test_gspo_weights_each_sequence(correction, weight):
    ratios = [9.0, 1.0] if weight in (2.0, 0.0) else [1.5, 1.5]  # sequence ratio exp(mean log r): 3 or 1.5
    batch, lp = one_sequence_batch(ratios)
    term = build_objective("gspo", importance_correction=correction, is_cap=2.0)(batch)["sequences"]
    assert term.item() == pytest.approx(-weight)
    (grad,) = torch.autograd.grad(term, lp)
    torch.testing.assert_close(grad, torch.full((2,), -weight / 2, dtype=D))  # d s̄ / d lp_t = 1/2


def test_real_weights_scale_each_rollouts_term():
    """L = log(1 + sum_P w_i e^{-s_i/tau}) + log(1 + sum_N w_j e^{s_j/tau}); weight 0 = not in the group."""
    tau = 0.5
    scores = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=D, requires_grad=True)
    labels = torch.tensor([1, 1, 0, 0])
    groups = torch.zeros(4, dtype=torch.long)
    w = torch.tensor([2.0, 0.5, 1.5, 0.0], dtype=D)
    loss = real_loss(scores, labels, groups, tau=tau, weights=w)
    s = scores.detach()
    expect = math.log(1 + 2.0 * math.exp(-s[0] / tau) + 0.5 * math.exp(-s[1] / tau)) + math.log(
        1 + 1.5 * math.exp(s[2] / tau)
    )
    assert loss.item() == pytest.approx(expect, rel=1e-14)
    (grad,) = torch.autograd.grad(loss, scores)
    assert grad[3] == 0
    # weight 0: exactly the loss without that rollout; all weights 1: REAL itself
    for variant in ("real", "no_anchor", "bce"):
        kw = dict(tau=tau, variant=variant, skip_uniform_groups=True)
        without = real_loss(s[:3], labels[:3], groups[:3], weights=w[:3], **kw)
        assert real_loss(s, labels, groups, weights=w, **kw).item() == pytest.approx(without.item(), rel=1e-14)
        assert real_loss(s, labels, groups, weights=torch.ones(4, dtype=D), **kw).item() == pytest.approx(
            real_loss(s, labels, groups, **kw).item(), rel=1e-14
        )
        across = real_loss_across_ranks(s, labels, groups, 1, weights=w, **kw)
        assert across.item() == pytest.approx(without.item(), rel=1e-12)
    # a NaN score of a rollout out of the loss (weight 0) reaches neither the loss nor any gradient
    nan_scores = s.clone()
    nan_scores[3] = float("nan")
    nan_scores.requires_grad_(True)
    for loss_fn in (real_loss, lambda *a, **k: real_loss_across_ranks(a[0], a[1], a[2], 1, **k)):
        value = loss_fn(nan_scores, labels, groups, tau=tau, weights=w)
        (grad,) = torch.autograd.grad(value, nan_scores)
        assert value.item() == pytest.approx(expect, rel=1e-12) and torch.isfinite(grad).all()
    # a group whose only negative is out of the loss is uniform: skipped
    assert (
        real_loss(
            s, labels, groups, weights=torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D), skip_uniform_groups=True
        ).item()
        == 0.0
    )


def test_real_importance_weight_is_the_length_normalised_ratio():
    # two rollouts, pi_theta = pi_old (s = 0): REAL = log(1 + w_pos) + log(1 + w_neg)
    seq = torch.tensor([0, 0, 1])
    old = torch.tensor([-1.0, -1.0, -2.0], dtype=D)
    engine = old - torch.tensor([9.0, 1.0, 1.5], dtype=D).log()  # sequence ratios 3 (capped to 2) and 1.5
    batch = PolicyBatch(
        old.clone().requires_grad_(True),
        old,
        torch.ones(3, dtype=torch.bool),
        seq,
        torch.tensor([1, 0]),
        torch.tensor([0, 0]),
        engine_logprobs=engine,
    )
    assert build_objective("real", importance_correction="tis")(batch)["groups"].item() == pytest.approx(
        math.log(3.0) + math.log(2.5)
    )
    assert build_objective("real")(batch)["groups"].item() == pytest.approx(2 * math.log(2.0))  # off by default
    with pytest.raises(ValueError, match="engine's log-probs"):
        build_objective("dapo", importance_correction="mis")(
            PolicyBatch(batch.logprobs, old, batch.loss_mask, seq, batch.rewards, batch.group_ids)
        )


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_real_token_unit_weighs_each_tokens_term_of_the_score(correction):
    """importance_unit=token: s̄_i = mean_t w_t (log pi - log pi_old), w_t the capped pi_old / pi_engine
    of the token; 0 at the first update, and dL/dlog pi_t = dL/ds̄_i x w_t / n_i."""
    seq = torch.tensor([0, 0, 0, 1, 1])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], dtype=D)
    ratio = torch.tensor([0.5, 3.0, 1e-7, 1.0, 1.25], dtype=D)  # pi_old / pi_engine per token
    engine = old - ratio.log()
    w = {"tis": ratio.clamp(max=2.0), "mis": torch.where((ratio >= 0.5) & (ratio <= 2.0), ratio, 0.0)}[correction]
    shift = torch.tensor([0.3, -0.2, 5.0, 0.1, -0.4], dtype=D)  # a later update: pi_theta != pi_old
    for delta in (torch.zeros(5, dtype=D), shift):
        logprobs = (old + delta).requires_grad_(True)
        batch = PolicyBatch(
            logprobs,
            old,
            torch.ones(5, dtype=torch.bool),
            seq,
            torch.tensor([1, 0]),
            torch.tensor([0, 0]),
            engine_logprobs=engine,
        )
        loss = build_objective("real", importance_correction=correction, importance_unit="token")(batch)["groups"]
        loss.backward()
        scores = torch.stack([(w * delta)[:3].sum() / 3, (w * delta)[3:].sum() / 2]).requires_grad_(True)
        reference = real_loss(scores, torch.tensor([1, 0]), torch.tensor([0, 0]), tau=0.5)
        reference.backward()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
        expected = scores.grad[seq] * w / torch.tensor([3.0, 3, 3, 2, 2], dtype=D)
        torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-15)
    assert logprobs.grad[2].abs() < 1e-6  # the token pi_old all but ruled out pulls (almost) nothing
    with pytest.raises(ConfigError, match="importance_unit applies to REAL's objectives"):
        load_config(None, ["algorithm.name=grpo", "algorithm.importance_unit=token"])


def test_real_bce_is_the_papers_mean_over_informative_rollouts():
    """The released code: binary_cross_entropy_with_logits(s/tau, labels, reduction='mean') over the
    rollouts of groups with both labels. Same value and gradient here, in float64."""
    gen = torch.Generator().manual_seed(3)
    G, n, tau = 8, 6, 0.5
    scores = (torch.randn(G * n, generator=gen, dtype=D) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 2, (G * n,), generator=gen)
    labels[:n] = 1  # group 0 uniform
    labels[n : 2 * n] = 0  # group 1 uniform
    labels[2 * n :: n], labels[2 * n + 1 :: n] = 1, 0  # the others mixed
    groups = torch.arange(G).repeat_interleave(n)
    seq = torch.arange(G * n)
    batch = PolicyBatch(scores, torch.zeros(G * n, dtype=D), torch.ones(G * n, dtype=torch.bool), seq, labels, groups)
    informative = torch.tensor([len(set(labels[groups == g].tolist())) == 2 for g in range(G)])[groups]
    counts = {"groups": G, "sequences": G * n, "tokens": G * n, "informative_sequences": int(informative.sum())}
    assert counts["informative_sequences"] == (G - 2) * n

    loss = normalise(build_objective("real_bce")(batch), counts)
    paper = F.binary_cross_entropy_with_logits(scores[informative] / tau, labels[informative].to(D), reduction="mean")
    assert loss.item() == pytest.approx(paper.item(), rel=1e-14)
    (g_ours,) = torch.autograd.grad(loss, scores)
    (g_paper,) = torch.autograd.grad(paper, scores)
    torch.testing.assert_close(g_ours, g_paper, rtol=1e-13, atol=0)
    # the other normalisation: per-group sums over prompts, G x informative/prompts times larger here
    prompts = normalise(build_objective("real_bce", bce_normalise="prompts")(batch), counts)
    assert prompts.item() == pytest.approx(paper.item() * (G - 2) * n / G, rel=1e-13)


def test_config_options_and_their_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task:\n  name: arithmetic\n")
    cfg = load_config(cfg_file)
    a = cfg.algorithm
    assert (a.dynamic_sampling, a.truncated, a.importance_correction, a.bce_normalise) == (
        False,
        "keep",
        "none",
        "rollouts",
    )
    with pytest.raises(ConfigError, match="REAL's rewards are class labels"):
        load_config(cfg_file, ["algorithm.overlong_buffer_tokens=16", "rollout.max_new_tokens=64"])
    assert (
        load_config(
            cfg_file, ["algorithm.name=dapo", "algorithm.overlong_buffer_tokens=16", "rollout.max_new_tokens=64"]
        ).algorithm.overlong_buffer_tokens
        == 16
    )
    with pytest.raises(ConfigError, match="overlong_buffer_tokens=128 must lie in"):
        load_config(
            cfg_file, ["algorithm.name=dapo", "algorithm.overlong_buffer_tokens=128", "rollout.max_new_tokens=64"]
        )
    with pytest.raises(ConfigError, match="is_cap must be > 1"):
        load_config(cfg_file, ["algorithm.is_cap=0.5"])
    with pytest.raises(ConfigError, match="every ratio pi_old / pi_engine is 1"):
        load_config(cfg_file, ["algorithm.importance_correction=tis", "rollout.use_engine_logprobs=true"])
    with pytest.raises(ConfigError, match="max_sampling_rounds must be > 0"):
        load_config(cfg_file, ["algorithm.max_sampling_rounds=0"])
