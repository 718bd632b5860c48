"""Pass@1 on benchmark files, as the paper reports it: k samples per problem, the fraction correct
averaged over the problems of each benchmark, and the average over benchmarks (Table 1's "Avg.").

Used by the trainer (held-out pass@1 before, during and after RL) and by `real-megatron eval`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .data.settings import DataConfig
from .rewards import score_groups
from .rollout.collect import generate_trajectories, sampling_seed, trajectory_metrics
from .rollout.types import SamplingParams


@dataclass
class EvalConfig:
    """The `eval` section: held-out pass@1 during and after training."""

    every_steps: int = 0  # 0 = never during training
    files: list[str] = field(default_factory=list)
    k: int = 16  # samples per problem for pass@1
    temperature: float = 0.6
    max_new_tokens: int = 8192

    def check(self) -> list[str]:
        errors = [
            f"eval.{k} must be > 0, got {getattr(self, k)}" for k in ("k", "max_new_tokens") if getattr(self, k) <= 0
        ]
        if self.every_steps < 0:
            errors.append(f"eval.every_steps must be >= 0 (0: never during training), got {self.every_steps}")
        if self.temperature < 0:
            errors.append(f"eval.temperature must be >= 0, got {self.temperature}")
        return errors


def pass_at_1(per_problem: list[float]) -> tuple[float, float]:
    """Mean over problems of the per-problem fraction correct, and its standard error."""
    n = len(per_problem)
    mean = sum(per_problem) / n
    var = sum((x - mean) ** 2 for x in per_problem) / max(1, n - 1)
    return mean, math.sqrt(var / n)


def evaluate_sets(
    engine,
    tokenizer,
    sets: dict,
    reward_fn,
    k: int,
    params: SamplingParams,
    timeout_s: float = DataConfig.verifier_timeout_s,
    progress: bool = False,
    runner=None,
) -> dict:
    """sets: name -> list of Example. Returns per-benchmark results, their average, and the pooled
    pass@1 over every problem (`pass1`, `stderr`), with problem and sample counts. runner: the
    multi-turn rollout loop (rollout/collect.make_trajectory_runner): each sample is then a
    trajectory with the run's environment and turn limits, and each benchmark also reports
    turns_mean and the environment's counts (tool_calls_mean, ...)."""
    benchmarks, pooled = {}, []
    items = sets.items()
    if progress:
        from .progress import progress as bar

        items = bar(list(items), desc=f"pass@1 (k={k})", unit="benchmark")
    for name, examples in items:
        start = time.perf_counter()
        extra = {}
        if runner is not None:
            rollouts, _ = generate_trajectories(runner, engine, tokenizer, reward_fn, examples, k, params, timeout_s)
            rewards = [r.reward for r in rollouts]
            truncated = [r.truncated for r in rollouts]
            lengths = [r.num_model_tokens for r in rollouts]
            extra = trajectory_metrics(rollouts)
        else:
            groups = engine.generate([ex.prompt_ids for ex in examples], k, params)
            rewards = score_groups(groups, examples, tokenizer, reward_fn, timeout_s)
            truncated = [s.finish_reason == "length" for g in groups for s in g]
            lengths = [len(s.output_ids) for g in groups for s in g]
        per_problem = [sum(rewards[i * k : (i + 1) * k]) / k for i in range(len(examples))]
        mean, stderr = pass_at_1(per_problem)
        benchmarks[name] = {
            "pass1": mean,
            "stderr": stderr,
            "problems": len(examples),
            "samples": len(rewards),
            "truncated_ratio": sum(truncated) / len(rewards),
            "response_length_mean": sum(lengths) / len(lengths),
            "seconds": time.perf_counter() - start,
            **extra,
        }
        pooled += per_problem
    mean, stderr = pass_at_1(pooled)
    # multi-turn: the trajectory counts (turns_mean, tool_calls_mean, ...) pooled over every sample
    counts = sorted(
        {key for b in benchmarks.values() for key in b if key.endswith("_mean") and key != "response_length_mean"}
    )
    total = sum(b["samples"] for b in benchmarks.values())
    trajectory = {key: sum(b.get(key, 0.0) * b["samples"] for b in benchmarks.values()) / total for key in counts}
    return {
        **trajectory,
        "benchmarks": benchmarks,
        "average": sum(b["pass1"] for b in benchmarks.values()) / len(benchmarks),
        "pass1": mean,
        "stderr": stderr,
        "problems": len(pooled),
        "samples": len(pooled) * k,
        "k": k,
    }


def table_rows(reports: dict[str, dict]) -> str:
    """Markdown rows like the paper's Table 1: one row per model, pass@1 in % per benchmark and Avg."""
    names = list(next(iter(reports.values()))["benchmarks"])
    lines = ["| Model | " + " | ".join(names) + " | Avg. |", "|---" * (len(names) + 2) + "|"]
    for model, report in reports.items():
        cells = [f"{100 * report['benchmarks'][n]['pass1']:.1f}" for n in names]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {100 * report['average']:.1f} |")
    return "\n".join(lines)


def evaluate(
    engine, inputs, settings: EvalConfig, step: int, *, seed: int, verifier_timeout_s: float, runner=None
) -> dict:
    """Held-out pass@1 (settings.k samples per problem), per eval set and pooled, with its standard
    error; the samples drawn from a seed of (run seed, step), so a resumed run evaluates alike.
    runner: multi-turn runs' rollout loop (their samples are trajectories, as in training)."""
    params = SamplingParams(
        temperature=settings.temperature,
        top_p=1.0,
        max_new_tokens=settings.max_new_tokens,
        stop_token_ids=inputs.stop_ids,
        seed=sampling_seed(seed, "evaluation", step),
    )
    sets = {name: dataset.examples for name, dataset in inputs.eval_sets.items()}
    start = time.perf_counter()
    result = evaluate_sets(
        engine,
        inputs.tokenizer,
        sets,
        inputs.reward_fn,
        settings.k,
        params,
        timeout_s=verifier_timeout_s,
        runner=runner,
    )
    return dict(result, eval_s=time.perf_counter() - start)


def run_summary(cfg, baseline: dict, final: dict, seconds: float, warmstart: dict | None) -> dict:
    """summary.json: pass@1 before and after RL, pooled and per eval file (as Table 1 reports it)."""
    return {
        "baseline_pass1": baseline["pass1"],
        "final_pass1": final["pass1"],
        "gain": final["pass1"] - baseline["pass1"],
        "eval_samples": final["samples"],
        "eval_problems": final["problems"],
        "stderr": final["stderr"],
        "baseline_stderr": baseline["stderr"],
        "steps": cfg.train.steps,
        "algorithm": cfg.algorithm.name,
        "seconds": seconds,
        "baseline_benchmarks": {n: b["pass1"] for n, b in baseline.get("benchmarks", {}).items()},
        "final_benchmarks": {n: b["pass1"] for n, b in final["benchmarks"].items()},
        "warmstart": warmstart,
        # multi-turn runs: tool use before and after RL beside pass@1
        **{f"baseline_{k}": v for k, v in baseline.items() if k.endswith("_mean")},
        **{f"final_{k}": v for k, v in final.items() if k.endswith("_mean")},
    }
