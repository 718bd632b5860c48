"""Group-aligned, token-balanced micro-batches (pure Python: no process group needed)."""

import random

import pytest
import torch

from real_megatron.actor.batching import build_mini_batches, plan_mini_batches
from real_megatron.rollout.types import Rollout


def rollouts(num_groups=8, per_group=4, seed=0):
    rng = random.Random(seed)
    out = []
    for g in range(num_groups):
        prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(2, 9))]
        for k in range(per_group):
            out.append(Rollout(prompt, [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))], float(k % 2), g))
    rng.shuffle(out)  # any arrival order
    return out


@pytest.mark.parametrize("groups_per_mini,groups_per_micro,dp", [(8, 8, 1), (8, 2, 2), (4, 1, 4), (8, 4, 3)])
def test_plan_is_group_aligned_complete_and_balanced(groups_per_mini, groups_per_micro, dp):
    rs = rollouts()
    plan = plan_mini_batches(rs, groups_per_mini, groups_per_micro, dp)
    seen = [i for mini in plan for micro in mini for ranks in micro for i in ranks]
    assert sorted(seen) == list(range(len(rs)))  # every rollout exactly once
    for mini in plan:
        assert len(mini) == groups_per_mini // groups_per_micro
        groups_of_micro = [{rs[i].group for ranks in micro for i in ranks} for micro in mini]
        assert all(len(g) == groups_per_micro for g in groups_of_micro)
        for a in range(len(groups_of_micro)):  # a group never straddles two micro-batch indices
            for b in range(a + 1, len(groups_of_micro)):
                assert not groups_of_micro[a] & groups_of_micro[b]
        for micro in mini:
            assert all(ranks for ranks in micro)  # no idle rank
            loads = [sum(rs[i].num_tokens for i in ranks) for ranks in micro]
            longest = max(rs[i].num_tokens for ranks in micro for i in ranks)
            assert max(loads) - min(loads) <= longest  # greedy longest-first bound


def test_micro_batch_tensors_point_at_response_tokens():
    rs = [
        Rollout([5, 6, 7], [8, 9], 1.0, 3),
        Rollout([5, 6, 7], [10], 0.0, 3),
        Rollout([1], [2, 3, 4], 1.0, 9),
        Rollout([1], [4], 0.0, 9),
    ]
    (mini,) = build_mini_batches(rs, groups_per_mini=2, groups_per_micro=2, dp_size=1, dp_rank=0)
    (mb,) = mini.micro_batches
    assert mini.num_groups == 2 and mini.num_sequences == 4 and mini.num_tokens == 7
    # the logit at (row, col) predicts the token at (row, col + 1), which must be the target
    assert torch.equal(mb.tokens[mb.rows, mb.cols + 1], mb.targets)
    assert sorted(mb.targets.tolist()) == [2, 3, 4, 4, 8, 9, 10]
    assert mb.group_index.tolist() == [0, 0, 1, 1] and mb.num_groups == 2
    assert torch.equal(mb.seq_index, mb.rows)
    # advantages: group-normalised rewards
    assert mb.advantages[0] > 0 and mb.advantages[1] < 0


def test_uniform_shapes_for_pipeline_parallel():
    rs = rollouts(num_groups=4, per_group=3, seed=2)
    minis = build_mini_batches(rs, 4, 1, dp_size=2, dp_rank=1, uniform_shape=True)
    shapes = {tuple(mb.tokens.shape) for mb in minis[0].micro_batches}
    assert len(shapes) == 1
    for mb in minis[0].micro_batches:
        assert len(mb.rollout_ids) <= mb.tokens.shape[0] and torch.equal(mb.tokens[mb.rows, mb.cols + 1], mb.targets)


def test_bad_plans_are_explained():
    rs = rollouts(num_groups=6)
    with pytest.raises(ValueError, match="do not split into mini-batches of 4 groups"):
        plan_mini_batches(rs, 4, 2, 1)
    with pytest.raises(ValueError, match="fewer than the 8 data-parallel ranks"):
        plan_mini_batches(rollouts(num_groups=2, per_group=2), 2, 1, 8)
    with pytest.raises(ValueError, match="rollout 0 .* has an empty response"):
        build_mini_batches([Rollout([1], [], 1.0, 0)], 1, 1, 1, 0)


@pytest.mark.parametrize("dp,budget", [(1, 130), (2, 70), (3, 50)])
def test_token_budget_bounds_every_rank_and_keeps_groups_whole(dp, budget):
    rs = rollouts(num_groups=8, per_group=4, seed=3)
    plan = plan_mini_batches(rs, 8, 8, dp, max_tokens=budget)
    seen = [i for mini in plan for micro in mini for ranks in micro for i in ranks]
    assert sorted(seen) == list(range(len(rs)))
    for mini in plan:
        groups_of_micro = [{rs[i].group for ranks in micro for i in ranks} for micro in mini]
        assert sum(len(g) for g in groups_of_micro) == len(set().union(*groups_of_micro))  # no group in two
        for micro in mini:
            loads = [sum(rs[i].num_tokens for i in ranks) for ranks in micro]
            assert all(ranks for ranks in micro) and max(loads) <= budget
        # first fit: no two micro-batches could have been one
        total = sum(rs[i].num_tokens for micro in mini for ranks in micro for i in ranks)
        assert len(mini) >= -(-total // (dp * budget))
    assert len(plan[0]) > 1  # the budget really cut the mini-batch
    # the plan depends on the rollouts only: every rank computes the same one
    assert plan == plan_mini_batches(list(rs), 8, 8, dp, max_tokens=budget)


def test_budget_errors_name_the_rollout_or_group_and_the_fix():
    rs = rollouts(num_groups=2, per_group=4, seed=4)
    longest = max(r.num_tokens for r in rs)
    with pytest.raises(
        ValueError, match=rf"{longest} tokens, more than actor.max_tokens_per_micro_batch={longest - 1}"
    ):
        plan_mini_batches(rs, 2, 2, 1, max_tokens=longest - 1)
    # every rollout fits, but a group of 4 does not fit one rank: it cannot be split
    with pytest.raises(
        ValueError, match=r"prompt group \d \(4 rollouts, \d+ tokens\) does not fit one micro-batch of 1"
    ):
        plan_mini_batches(rs, 2, 2, 1, max_tokens=longest)
    assert plan_mini_batches(rs, 2, 2, 4, max_tokens=longest)  # over 4 ranks it does


def test_packed_row_restarts_positions_and_points_at_response_tokens():
    rs = [
        Rollout([5, 6, 7], [8, 9], 1.0, 3),
        Rollout([5, 6, 7], [10], 0.0, 3),
        Rollout([1], [2, 3, 4], 1.0, 9),
        Rollout([1], [4], 0.0, 9),
    ]
    (mini,) = build_mini_batches(rs, 2, 2, dp_size=1, dp_rank=0, packed=True, pad_to_multiple=8)
    (mb,) = mini.micro_batches
    assert mb.tokens.shape == (1, 16)  # 5 + 4 + 4 + 2 = 15 tokens, padded to a multiple of 8
    assert mb.cu_seqlens.tolist() == [0, 5, 9, 13, 15, 16] and mb.max_seqlen == 5  # the padding is a segment
    assert mb.cu_seqlens.dtype == torch.int32 and mb.sequence_tokens == 15
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0]
    assert torch.equal(mb.tokens[mb.rows, mb.cols + 1], mb.targets)
    assert mb.seq_index.tolist() == [0, 0, 1, 2, 2, 2, 3]
    padded = build_mini_batches(rs, 2, 2, dp_size=1, dp_rank=0)[0].micro_batches[0]
    assert torch.equal(padded.targets, mb.targets) and torch.equal(padded.seq_index, mb.seq_index)
    from real_megatron.actor.batching import padding_fraction

    assert padding_fraction([mb]) == pytest.approx(1 / 16)
    assert padding_fraction([padded]) == pytest.approx(1 - 15 / 20)
    params = mb.packed_seq_params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == 5 and params.cu_seqlens_kv is mb.cu_seqlens
    assert padded.packed_seq_params() is None


def test_packed_rows_share_one_width_for_pipeline_parallel():
    rs = rollouts(num_groups=4, per_group=3, seed=2)
    minis = build_mini_batches(rs, 4, 1, dp_size=2, dp_rank=0, uniform_shape=True, packed=True, pad_to_multiple=4)
    widths = {mb.tokens.shape for mb in minis[0].micro_batches}
    assert len(widths) == 1 and next(iter(widths))[1] % 4 == 0
    for mb in minis[0].micro_batches:
        assert mb.cu_seqlens[-1] == mb.tokens.shape[1]


def test_excluded_rollouts_leave_counts_and_advantages_and_penalties_shape_them():
    import math

    # group 0: labels 1, 0, 1 (the last excluded) -> advantages over [1, 0] only; group 1: uniform once
    # its negative is excluded, so it is not informative; group 2: rewards shaped by overlong penalties
    rs = [
        Rollout([1, 2], [3, 4], 1.0, 0),
        Rollout([1, 2], [5], 0.0, 0),
        Rollout([1, 2], [6, 7, 8], 1.0, 0, in_loss=False),
        Rollout([9], [3], 1.0, 1),
        Rollout([9], [4, 4], 0.0, 1, in_loss=False),
        Rollout([7], [3], 1.0, 2, penalty=-0.5),
        Rollout([7], [4], 1.0, 2),
    ]
    rs.append(Rollout([9], [5], 1.0, 1))
    (mini,) = build_mini_batches(rs, groups_per_mini=3, groups_per_micro=3, dp_size=1, dp_rank=0)
    (mb,) = mini.micro_batches
    assert mini.num_sequences == 6 and mini.num_tokens == 2 + 1 + 1 + 1 + 1 + 1  # excluded ones not counted
    assert mini.num_informative_sequences == 2  # group 0's two rollouts in the loss
    by_id = dict(zip(mb.rollout_ids, mb.advantages.tolist()))
    active = dict(zip(mb.rollout_ids, mb.active.tolist()))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # two rollouts, rewards r and r - 1: +-0.5 over the unbiased std
    assert by_id[0] == pytest.approx(a) and by_id[1] == pytest.approx(-a) and by_id[2] == 0 and not active[2]
    assert by_id[3] == 0 and by_id[7] == 0 and by_id[4] == 0  # group 1: uniform among those in the loss
    b = 0.25 / (math.sqrt(0.125) + 1e-6)  # rewards 0.5 and 1: shaped, not labels
    assert by_id[5] == pytest.approx(-b) and by_id[6] == pytest.approx(b)
    assert mb.rewards.tolist()[mb.rollout_ids.index(5)] == 1.0  # the label REAL sees is unchanged
