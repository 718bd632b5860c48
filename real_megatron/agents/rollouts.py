"""The rollout loop of multi-turn runs: environments and an engine, turn by turn, into trajectories.

Each of a step's prompts gets rollout.n_samples trajectories, each with its own environment
instance: `reset(example)` gives the first messages, the engine samples the model's turn from the
token ids so far, `step(reply_text)` gives what follows, the chat template's glue (trajectory.py)
is appended as ids, and so on until the environment says done, `rollout.max_turns` model turns
have run, or the trajectory's token budget is spent: rollout.max_new_tokens after the prompt (model
turns and what comes between them), and data.max_prompt_tokens + rollout.max_new_tokens in all, the
bound of a single-turn rollout, so the actor's token budget holds.

Two drivers, one trajectory logic:
- engines that generate many requests at once from one call (the embedded engine) run the
  trajectories in lock-step: one `generate` call per turn for every trajectory still going, the
  environments' steps of that turn run concurrently on threads;
- engines that take concurrent calls (the SGLang fleet: `concurrent_calls = True`) run every
  trajectory on a thread of its own, so one trajectory's tool latency overlaps the others'
  generation, and its turns go to the server of its first turn (its prefix is cached there) while
  that server lives.

A trajectory whose last segment is not the model's (the turn or token limit reached after the
environment answered) ends at its last model turn: tokens after every model token change no
model token's log-prob, so they need not be trained on or fed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional

from .environment import EnvironmentHandle
from .trajectory import ChatGlue, Trajectory, check_append_only, render

log = logging.getLogger(__name__)

# distinct seeds for the turns of one step's call (the embedded engine's seed per call)
_TURN_SEED_STRIDE = 2 * 10**14  # beyond the rounds' strides (collect.sampling_seed)


@dataclass
class TurnLimits:
    max_turns: int
    total_tokens: int  # prompt + everything after it (data.max_prompt_tokens + rollout.max_new_tokens)
    tokens_per_turn: int = 0  # 0: the rest of the budget
    response_tokens: int = 0  # everything after the prompt (rollout.max_new_tokens); 0: no bound but the total


def example_dict(ex) -> dict:
    """The data row as an environment's reset() sees it."""
    return {
        "prompt": ex.messages,
        "ground_truth": ex.ground_truth,
        "data_source": ex.data_source,
        "extra_info": dict(ex.extra),
        "source": ex.source,
    }


class TrajectoryRunner:
    """Runs a batch of trajectories on an engine: one per (example, sample), each with a fresh
    environment from `make_env`."""

    def __init__(self, make_env: Callable, tokenizer, stop_ids, limits: TurnLimits, max_workers: int = 64):
        self.make_env, self.tokenizer, self.limits = make_env, tokenizer, limits
        self.stop_ids = tuple(stop_ids)
        self.max_workers = max_workers
        self._glue: dict = {}  # ChatGlue per tool set, checked once

    def glue(self, tools: Optional[list[dict]]) -> ChatGlue:
        key = repr(tools)
        if key not in self._glue:
            glue = ChatGlue(self.tokenizer, self.stop_ids, tools)
            check_append_only(glue)
            self._glue[key] = glue
        return self._glue[key]

    # --- one trajectory's steps ------------------------------------------------------------------

    def start(self, example: dict, max_response: int = 0) -> tuple[Trajectory, EnvironmentHandle, ChatGlue]:
        """A trajectory of `example` with a fresh environment; max_response: the call's own bound on
        the tokens after the prompt (the sampling parameters' max_new_tokens: eval.max_new_tokens in an
        evaluation), within the limits'."""
        env = EnvironmentHandle(self.make_env())
        messages = env.reset(example)
        glue = self.glue(env.tools())
        prompt = render(self.tokenizer, messages, True, glue.tools)
        if len(prompt) >= self.limits.total_tokens:
            env.close()
            raise ValueError(
                f"{example.get('source', 'a prompt')}: the environment's first messages render to {len(prompt)} tokens, "
                f"no room in the trajectory's budget of {self.limits.total_tokens} (data.max_prompt_tokens + "
                "rollout.max_new_tokens)"
            )
        traj = Trajectory(prompt, max_response=max_response)
        traj.turns = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
        return traj, env, glue

    def room(self, traj: Trajectory) -> int:
        """Tokens the trajectory may still grow by."""
        left = self.limits.total_tokens - len(traj.context)
        for bound in (self.limits.response_tokens, traj.max_response):
            if bound:
                left = min(left, bound - len(traj.ids))
        return left

    def turn_budget(self, traj: Trajectory) -> int:
        left = self.room(traj)
        return min(left, self.limits.tokens_per_turn) if self.limits.tokens_per_turn else left

    def after_sample(self, traj, env, glue, ids, logprobs, finish, version, routed=None) -> bool:
        """Record a model turn and ask the environment what follows; True while the trajectory goes on."""
        if not ids:  # an empty turn: the stop token stands in
            ids, logprobs = list(self.stop_ids[:1]), None
        fed_before = len(traj.context)
        stopped = ids[-1] in self.stop_ids
        text = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False)
        traj.add_model_turn(list(ids), logprobs, text, version)
        if routed is not None:
            traj.routed.append((fed_before, len(ids), routed))
        if finish == "length" or not stopped:
            traj.finish = "tokens" if self.room(traj) <= 0 else "length"
            return False
        result = env.step(text)
        if result.reward is not None:
            traj.reward = result.reward
        if result.done:
            traj.finish = "done"
            traj.turns += [{"role": m.get("role"), "content": m.get("content")} for m in result.messages]
            return False
        between = glue.between(result.messages)
        if traj.model_turns >= self.limits.max_turns:
            traj.finish = "turns"
        elif len(between) >= self.room(traj):  # no room left for the model's next turn
            traj.finish = "tokens"
        traj.add_between(between, result.messages)
        if traj.finish:  # tokens after the last model turn are not kept (see the module docstring)
            traj.cut(len(traj.ids) - len(between))
            return False
        return True

    def finish(self, traj: Trajectory, env: EnvironmentHandle) -> None:
        traj.stats.update({k: v for k, v in (getattr(env.env, "stats", None) or {}).items()})
        env.close()

    # --- drivers ---------------------------------------------------------------------------------

    def run(self, engine, examples: list[dict], n: int, params) -> list[list[Trajectory]]:
        """n trajectories per example, grouped per example."""
        params = replace(params, stop_token_ids=tuple(params.stop_token_ids) or self.stop_ids)
        if getattr(engine, "concurrent_calls", False):
            return self._run_concurrent(engine, examples, n, params)
        return self._run_lockstep(engine, examples, n, params)

    def _run_lockstep(self, engine, examples, n, params) -> list[list[Trajectory]]:
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            jobs = [e for e in examples for _ in range(n)]
            started = list(pool.map(self.start, jobs, [params.max_new_tokens] * len(jobs)))
            live = list(range(len(started)))
            turn = 0
            while live:
                budgets = [self.turn_budget(started[i][0]) for i in live]
                call = replace(
                    params,
                    max_new_tokens=max(budgets),
                    seed=None if params.seed is None else params.seed + turn * _TURN_SEED_STRIDE,
                )
                samples = engine.generate([started[i][0].context for i in live], 1, call)

                states = [started[i] for i in live]
                going = list(pool.map(self._take, states, [s[0] for s in samples], budgets))
                for k in [k for k, g in enumerate(going) if not g]:
                    self.finish(*started[live[k]][:2])
                live = [i for i, g in zip(live, going) if g]
                turn += 1
        return [[started[p * n + k][0] for k in range(n)] for p in range(len(examples))]

    def _take(self, state, sample, budget: int) -> bool:
        traj, env, glue = state
        ids, logprobs, finish = sample.output_ids, sample.logprobs, sample.finish_reason
        if len(ids) > budget:  # a shorter budget than the call's: the sample's prefix
            ids, finish = ids[:budget], "length"
            logprobs = logprobs[:budget] if logprobs else logprobs
        return self.after_sample(traj, env, glue, ids, logprobs, finish, sample.weight_version, sample.routed_experts)

    def _run_concurrent(self, engine, examples, n, params) -> list[list[Trajectory]]:
        def one(example: dict) -> Trajectory:
            traj, env, glue = self.start(example, params.max_new_tokens)
            try:
                while True:
                    call = replace(params, max_new_tokens=self.turn_budget(traj))
                    extra = {} if traj.server is None else {"prefer_server": traj.server}
                    s = engine.generate([traj.context], 1, call, **extra)[0][0]
                    traj.server = s.extra.get("server", traj.server)
                    if not self.after_sample(
                        traj, env, glue, s.output_ids, s.logprobs, s.finish_reason, s.weight_version, s.routed_experts
                    ):
                        return traj
            finally:
                self.finish(traj, env)

        jobs = [e for e in examples for _ in range(n)]
        # twice the engine's requests in flight: while some trajectories wait on their tools, others generate
        bound = 2 * getattr(engine, "max_in_flight", 2 * self.max_workers)
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), bound))) as pool:
            done = list(pool.map(one, jobs))
        return [done[p * n : (p + 1) * n] for p in range(len(examples))]


def routed_experts_of(traj: Trajectory):
    """The engine's experts for every fed token of the trajectory (prompt + response - 1 rows), each
    position from the turn whose call fed it; None unless every model turn carries them."""
    if not traj.routed or len(traj.routed) != traj.model_turns:
        return None
    import torch

    rows = len(traj.context) - 1
    parts, covered = [], 0
    for fed_before, length, experts in traj.routed:
        # this call fed positions 0..fed_before+length-2 (its last token is fed by the next call)
        end = min(rows, fed_before + length - 1)
        parts.append(experts[covered:end])
        covered = end
    out = torch.cat(parts)
    return out if out.shape[0] == rows else None
