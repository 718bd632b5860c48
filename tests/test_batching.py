"""Group-aligned, token-balanced micro-batches (pure Python: no process group needed)."""

import random

import pytest
import torch

from real_megatron.actor.batching import Rollout, build_mini_batches, plan_mini_batches


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
    rs = [Rollout([5, 6, 7], [8, 9], 1.0, 3), Rollout([5, 6, 7], [10], 0.0, 3), Rollout([1], [2, 3, 4], 1.0, 9),
          Rollout([1], [4], 0.0, 9)]
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
