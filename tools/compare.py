#!/usr/bin/env python
"""REAL against its variants and the baselines on the quickstart task, equal budgets, several seeds.

    .venv/bin/python tools/compare.py [--seeds 1 2 3] [--steps 150] [--out runs/compare] [a.b=c ...]
    .venv/bin/python tools/compare.py --dynamic-sampling      # every objective with DAPO's filter

Each (algorithm, seed) is one `real-megatron train configs/quickstart.yaml` run with the same task
settings, steps, prompts, rollouts, learning rate and evaluation; only algorithm.name and train.seed
change (the seed also picks the task split and warm-start, so seeds differ in their start model).
Finished runs are reused (their summary.json), so an interrupted comparison continues. Writes
<out>/compare.md (final pass@1 mean ± std over seeds, gain, steps to reach the threshold, entropy
at the end, prompts generated and informative groups per step) and <out>/compare.png (validation
pass@1 and reward against step). --dynamic-sampling sets algorithm.dynamic_sampling=true for every
run (default out: runs/compare-dynamic); a step then generates more prompts than it trains on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["real", "real_bce", "real_no_anchor", "grpo", "dapo", "gspo"]


def run_one(config: str, algorithm: str, seed: int, steps: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"{algorithm}-seed{seed}"
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        config,
        "--output-dir",
        str(run_dir),
        f"algorithm.name={algorithm}",
        f"train.seed={seed}",
        f"train.steps={steps}",
        "logging.progress_bar=false",
        *overrides,
    ]
    start = time.time()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"{algorithm} seed {seed} failed (exit {code}); see {log}")
    print(f"  {algorithm} seed {seed}: {time.time() - start:.0f} s", flush=True)
    return json.loads(summary.read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steps_to(rows: list[dict], threshold: float):
    for row in rows:
        if "val_pass1" in row and row["val_pass1"] >= threshold:
            return row["step"]
    return None


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict, out: Path, threshold: float, steps: int) -> str:
    lines = [
        f"| algorithm | final pass@1 | gain over warm-start | steps to pass@1 ≥ {threshold:.2f} | entropy at the end "
        "| prompts generated / step | informative groups / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for algorithm, runs in results.items():
        finals = [s["final_pass1"] for s, _ in runs]
        gains = [s["gain"] for s, _ in runs]
        reached = [steps_to(rows, threshold) for _, rows in runs]
        shown = ", ".join(str(r) if r is not None else f">{steps}" for r in reached)
        entropy = [statistics.mean([r["entropy"] for r in rows if "entropy" in r][-10:]) for _, rows in runs]

        def per_step(key, runs=runs):  # mean over a run's steps (runs logged before the key existed: not shown)
            values = [
                statistics.mean(r[key] for r in rows if key in r) for _, rows in runs if any(key in r for r in rows)
            ]
            return f"{statistics.mean(values):.1f}" if values else "-"

        lines.append(
            f"| {algorithm} | {mean_std(finals)} | {mean_std(gains)} | {shown} | {mean_std(entropy)} "
            f"| {per_step('prompts_generated')} | {per_step('informative_groups')} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_reward) = plt.subplots(1, 2, figsize=(12, 4.5))
    for algorithm, runs in results.items():
        # gain over each seed's own warm-start: seeds start from different models
        curves = [
            [(r["step"], r["val_pass1"] - summary["baseline_pass1"]) for r in rows if "val_pass1" in r]
            for summary, rows in runs
        ]
        steps = [s for s, _ in curves[0]]
        per_step = [[c[i][1] for c in curves if i < len(c)] for i in range(len(steps))]
        means = [statistics.mean(v) for v in per_step]
        (line,) = ax_val.plot(steps, means, marker="o", label=algorithm)
        ax_val.fill_between(
            steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.15, color=line.get_color()
        )
        rewards = [[r["reward_mean"] for r in rows if "reward_mean" in r] for _, rows in runs]
        length = min(map(len, rewards))
        mean_reward = [statistics.mean(r[i] for r in rewards) for i in range(length)]
        window = 10
        smooth = [statistics.mean(mean_reward[max(0, i - window + 1) : i + 1]) for i in range(length)]
        ax_reward.plot(range(1, length + 1), smooth, label=algorithm, color=line.get_color())
    ax_val.set(xlabel="RL step", ylabel="held-out pass@1 gain over the warm-start\n(mean over seeds, band: min-max)")
    ax_reward.set(xlabel="RL step", ylabel="training reward (mean over seeds, 10-step average)")
    for ax in (ax_val, ax_reward):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.72, help="held-out pass@1 to reach")
    parser.add_argument(
        "--out", default=None, help="default: runs/compare (runs/compare-dynamic with --dynamic-sampling)"
    )
    parser.add_argument("--dynamic-sampling", action="store_true", help="algorithm.dynamic_sampling=true for every run")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="applied to every run")
    args = parser.parse_args()
    if args.dynamic_sampling:
        args.overrides = ["algorithm.dynamic_sampling=true", *args.overrides]
    out = Path(args.out or ROOT / "runs" / ("compare-dynamic" if args.dynamic_sampling else "compare"))
    results = {}
    for algorithm in args.algorithms:
        runs = []
        for seed in args.seeds:
            summary = run_one(args.config, algorithm, seed, args.steps, out, args.overrides)
            runs.append((summary, read_metrics(out / f"{algorithm}-seed{seed}")))
        results[algorithm] = runs
    text = table(results, out, args.threshold, args.steps)
    budget = (
        f"{args.steps} RL steps per run, seeds {', '.join(map(str, args.seeds))}; pass@1 on the held-out "
        f"problems x k samples (see each run's config.yaml); ± is the standard deviation over seeds"
        + ("; dynamic sampling on (algorithm.dynamic_sampling=true)" if args.dynamic_sampling else "")
    )
    (out / "compare.md").write_text(text + "\n\n" + budget + "\n")
    plot(results, out / "compare.png")
    print(text)
    print(budget)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
