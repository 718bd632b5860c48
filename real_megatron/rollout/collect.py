"""One step's rollout batch: prompts -> samples -> verifier labels -> the batch the actor trains on.

With `algorithm.dynamic_sampling` (DAPO's filter) groups whose labels are all equal carry no
signal for any objective: they are set aside and another round of train.prompts_per_step prompts
is generated, until the batch holds train.prompts_per_step informative groups or
`algorithm.max_sampling_rounds` rounds have run (then uniform groups fill the batch, with a
warning: their labels carry no signal; with the default settings they add no gradient). Every prompt drawn is consumed from the dataset order,
kept or not, so the data position stays exact: a resumed step draws and samples exactly what the
interrupted one did (each round's seed is a function of run seed, step and round).

Multi-turn runs (`rollout.environment` or `rollout.tools`: real_megatron/agents/) make each
rollout a trajectory of several model turns with an environment; the verifier (or the
environment's reward) labels the trajectory, once, and everything after this point (truncation,
the filter, REAL's groups) treats it as one rollout.

Truncated responses (finish reason "length") are handled here too, before the filter:
`algorithm.truncated` keep | negative (label 0) | exclude (out of the loss and out of its group),
and DAPO's soft overlong penalty on the reward of the reward-weighted baselines.
"""

from __future__ import annotations

import logging
import time

from ..rewards import score_groups, score_responses
from .types import Rollout, SamplingParams, informative_groups

log = logging.getLogger(__name__)

_PURPOSES = ("rollouts", "evaluation")


def sampling_seed(seed: int, purpose: str, step: int, round: int = 0) -> int:
    """The embedded engine's seed for one call: a function of (run seed, purpose, step, sampling
    round) alone, so a run resumed from a checkpoint samples exactly what the uninterrupted run did.
    Distinct for every (purpose, step, round) of one run; round 0 keeps the seeds of runs before
    dynamic sampling existed (two runs whose seeds differ by a multiple of 10**6 share later rounds)."""
    return (seed * 1_000_003 + step) * 2 + _PURPOSES.index(purpose) + round * 2 * 10**12


def generate_rollouts(engine, inputs, examples, n: int, params: SamplingParams, timeout_s: float):
    """(rollouts, metrics) on rank 0: samples, decoded responses, verifier labels."""
    start = time.perf_counter()
    groups = engine.generate([ex.prompt_ids for ex in examples], n, params)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    rewards = score_groups(groups, examples, inputs.tokenizer, inputs.reward_fn, timeout_s)
    rollouts, k = [], 0
    for p, (ex, group) in enumerate(zip(examples, groups)):
        for sample in group:
            response = sample.output_ids or list(inputs.stop_ids[:1])
            engine_logprobs = sample.logprobs if sample.logprobs and len(sample.logprobs) == len(response) else None
            # the engine's routing belongs to the tokens it generated (none for a stand-in stop token)
            routed = sample.routed_experts if response is sample.output_ids else None
            rollouts.append(
                Rollout(
                    ex.prompt_ids,
                    response,
                    rewards[k],
                    p,
                    engine_logprobs,
                    sample.truncated,
                    weight_version=sample.weight_version,
                    source=ex.source,
                    routed_experts=routed,
                )
            )
            k += 1
    return rollouts, {"generate_s": gen_s, "reward_s": time.perf_counter() - start}


def make_trajectory_runner(inputs, cfg):
    """The multi-turn rollout loop of a run whose config names an environment or tools; None for
    single-turn runs. Built once: it checks the chat template (append-only) on first use."""
    r = cfg.rollout
    if not r.multi_turn:
        return None
    from ..agents.environment import environment_spec, load_environment_factory
    from ..agents.rollouts import TrajectoryRunner, TurnLimits

    spec, args = environment_spec(r)
    key = "rollout.environment" if r.environment else "rollout.tools"
    limits = TurnLimits(
        r.max_turns, cfg.data.max_prompt_tokens + r.max_new_tokens, r.max_tokens_per_turn, r.max_new_tokens
    )
    return TrajectoryRunner(load_environment_factory(spec, args, key), inputs.tokenizer, inputs.stop_ids, limits)


def generate_trajectories(
    runner, engine, tokenizer, reward_fn, examples, n: int, params: SamplingParams, timeout_s: float
):
    """(rollouts, metrics) of multi-turn generation on rank 0 (a step's, or an evaluation's):
    trajectories, labelled once each (the environment's reward, else the verifier on the last
    model turn)."""
    from ..agents.rollouts import example_dict, routed_experts_of

    start = time.perf_counter()
    groups = runner.run(engine, [example_dict(ex) for ex in examples], n, params)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    flat = [(ex, t) for ex, group in zip(examples, groups) for t in group]
    unlabelled = [k for k, (_, t) in enumerate(flat) if t.reward is None]
    texts = [tokenizer.decode(flat[k][1].last_turn_ids, skip_special_tokens=True) for k in unlabelled]
    scores = score_responses(reward_fn, texts, [flat[k][0].ground_truth for k in unlabelled], timeout_s)
    labels = {k: v for k, v in zip(unlabelled, scores)}
    rollouts = []
    for k, (ex, t) in enumerate(flat):
        rollouts.append(
            Rollout(
                t.prompt_ids,
                t.ids,
                labels.get(k, t.reward),
                k // n,
                None if t.stats.get("turns_without_logprobs") else t.logprobs,
                t.truncated,
                weight_version=t.weight_version or 0,
                source=ex.source,
                routed_experts=routed_experts_of(t),
                response_mask=t.mask,
                turns=t.turns,
                stats={**t.stats, "turns": t.model_turns, "finish": t.finish},
            )
        )
    return rollouts, {"generate_s": gen_s, "reward_s": time.perf_counter() - start}


def handle_truncated(rollouts: list[Rollout], algorithm, max_new_tokens: int) -> None:
    """algorithm.truncated and the overlong penalty, in place."""
    for r in rollouts:
        if r.truncated and algorithm.truncated == "negative":
            r.reward = 0.0
        elif r.truncated and algorithm.truncated == "exclude":
            r.in_loss = False
        if algorithm.overlong_buffer_tokens:
            r.penalty = overlong_penalty(
                len(r.response_ids), max_new_tokens, algorithm.overlong_buffer_tokens, algorithm.overlong_penalty
            )


def overlong_penalty(length: int, max_new_tokens: int, buffer_tokens: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer_tokens, then falling
    linearly to -factor at max_new_tokens."""
    exceed = length - (max_new_tokens - buffer_tokens)
    return -min(exceed / buffer_tokens, 1.0) * factor if exceed > 0 else 0.0


def collect_rollouts(engine, inputs, cfg, step: int, runner=None) -> tuple[list[Rollout], dict]:
    """Rank 0: the rollout batch of RL step `step` (train.prompts_per_step groups of
    rollout.n_samples) and its metrics, drawing prompts from inputs.train_set. runner: the
    multi-turn rollout loop (make_trajectory_runner), None for single-turn rollouts."""
    t, r, a = cfg.train, cfg.rollout, cfg.algorithm
    kept: list[list[Rollout]] = []  # groups to train on, in the order generated
    uniform: list[list[Rollout]] = []  # groups set aside by the filter
    timings = {"generate_s": 0.0, "reward_s": 0.0}
    rounds = 0
    while True:
        examples = inputs.train_set.next_batch(t.prompts_per_step)
        params = SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=inputs.stop_ids,
            seed=sampling_seed(t.seed, "rollouts", step, rounds),
        )
        if runner is not None:
            rollouts, phase = generate_trajectories(
                runner,
                engine,
                inputs.tokenizer,
                inputs.reward_fn,
                examples,
                r.n_samples,
                params,
                cfg.data.verifier_timeout_s,
            )
        else:
            rollouts, phase = generate_rollouts(
                engine, inputs, examples, r.n_samples, params, cfg.data.verifier_timeout_s
            )
        rounds += 1
        for key in timings:
            timings[key] += phase[key]
        handle_truncated(rollouts, a, r.max_new_tokens)
        informative = informative_groups(rollouts)
        for g in range(len(examples)):
            group = rollouts[g * r.n_samples : (g + 1) * r.n_samples]
            (kept if g in informative or not a.dynamic_sampling else uniform).append(group)
        if not a.dynamic_sampling or len(kept) >= t.prompts_per_step or rounds >= a.max_sampling_rounds:
            break
    if len(kept) < t.prompts_per_step:
        log.warning(
            "step %d: %d of %d prompt groups informative after %d sampling rounds "
            "(algorithm.max_sampling_rounds=%d); uniform groups fill the rest (their labels carry no signal)",
            step,
            len(kept),
            t.prompts_per_step,
            rounds,
            a.max_sampling_rounds,
        )
        kept += uniform[: t.prompts_per_step - len(kept)]
    batch = []
    for g, group in enumerate(kept[: t.prompts_per_step]):  # groups numbered 0..P-1 in the batch
        for rollout in group:
            rollout.group = g
        batch += group
    return batch, dict(
        timings,
        **batch_metrics(batch, r.n_samples, a),
        sampling_rounds=rounds,
        prompts_generated=rounds * t.prompts_per_step,
    )


def batch_metrics(rollouts: list[Rollout], n: int, algorithm) -> dict:
    groups = [rollouts[i : i + n] for i in range(0, len(rollouts), n)]
    metrics = {
        "informative_groups": len(informative_groups(rollouts)),
        "solved_all_ratio": sum(all(r.reward > 0 for r in g) for g in groups) / max(1, len(groups)),
        "truncated_ratio": sum(r.truncated for r in rollouts) / max(1, len(rollouts)),
    }
    if algorithm.truncated == "exclude":
        metrics["excluded_ratio"] = sum(not r.in_loss for r in rollouts) / len(rollouts)
    if algorithm.overlong_buffer_tokens:
        metrics["overlong_penalty_mean"] = sum(r.penalty for r in rollouts) / len(rollouts)
    metrics.update(trajectory_metrics(rollouts))
    return metrics


def trajectory_metrics(rollouts: list[Rollout]) -> dict:
    """Multi-turn runs: turns_mean, the mean of every count the environments report (tool_calls,
    tool_errors, sandbox_timeouts, ...: `<name>_mean`), and the shares truncated by the turn limit
    and by the token budget; {} for single-turn rollouts."""
    trajectories = [r for r in rollouts if r.turns is not None]
    if not trajectories:
        return {}
    n = len(trajectories)
    out = {
        "truncated_turns_ratio": sum(r.stats.get("finish") == "turns" for r in trajectories) / n,
        "truncated_tokens_ratio": sum(r.stats.get("finish") in ("tokens", "length") for r in trajectories) / n,
        "model_tokens_mean": sum(r.num_model_tokens for r in trajectories) / n,
    }
    names = sorted({k for r in trajectories for k, v in r.stats.items() if isinstance(v, (int, float))})
    for name in names:
        out[f"{name}_mean"] = sum(float(r.stats.get(name, 0)) for r in trajectories) / n
    return out
