#!/usr/bin/env python
"""Rollout batches per hour with rollout.max_staleness 0, 1 and 2: the quickstart through one real
SGLang server, the same server for every run, on this machine.

    .venv/bin/python tools/bench_async.py [--steps 12] [--warmup 2] [--staleness 0 1 2] [KEY=VALUE ...]

Each run is `real-megatron train configs/quickstart.yaml rollout.backend=sglang` attached to the
server (rollout.server_urls), one after the other, with evaluation and checkpoints off; KEY=VALUE
overrides go to every run and to the inputs (warm start) the server starts from. The server is
started with one key (OUT/fleet_api_key) and every run names that file (rollout.api_key_file):
a run's own key, made in its own run directory, would be refused by the server. The machine
is split the way one node is: the server gets the last CPU core and the trainer the others (taskset,
one compute thread each on a 2-core machine), so generation and training can overlap as they would
on separate GPUs. Phases come from each run's metrics.jsonl (the first --warmup steps not timed):
generation (rollouts and their labels), training (old log-probs and updates: the step minus the
waits and the weight sync), sync, and the waits. "ideal" is what full overlap of the measured
synchronous phases would give: one batch per max(generation, training) + sync instead of their sum
(generation pauses while the weights change).
The last table is a projection, not a measurement: the paper's 1.5B run on one 8-GPU node from the
per-phase figures stated there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
CPU_SERVER_ARGS = [
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--max-total-tokens",
    "16384",
    "--dtype",
    "float32",
    "--skip-tokenizer-init",
    "--sleep-on-idle",  # an idle scheduler otherwise spins a core the trainer needs
]

# Projection inputs for DeepSeek-R1-Distill-Qwen-1.5B on one node of 8 x H100 80 GB, 4 GPUs training
# (DP=4) and 4 SGLang servers (configs/real_r1distill_qwen_1p5b_1node.yaml): stated assumptions.
PROJECTION = {
    "batch": "128 prompts x 8 samples, mean response 5,000 tokens, longest 8,192",
    # 5.1M decoded tokens over 4 servers at ~15,000 tokens/s each (batch ~256) is 85 s, but the
    # longest 8,192-token response at ~60 tokens/s per sequence takes 137 s; + prefill and stragglers
    "generation_s": 160.0,
    # 5.3M tokens x 10 x 1.78e9 FLOPs (old log-probs 2, forward + backward 6, recompute 2) at 40% of
    # 4 x 989 TFLOP/s is 60 s; x 1.5 for the step's fixed costs (optimizer, packing, output layer)
    "training_s": 90.0,
    "sync_s": 6.0,  # 3.6 GB of bf16 weights written to and loaded from local NVMe
}


def server_python_on_core(core: int, work: Path) -> str:
    """SGLang's interpreter, wrapped so the server (and every process it starts) runs on `core`."""
    from real_megatron.rollout.sglang_env import default_server_python

    wrapper = work / "sglang-python"
    wrapper.write_text(f'#!/bin/sh\nexec taskset -c {core} {default_server_python()} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def run(
    k: int, steps: int, url: str, work: Path, trainer_cores: str, key_file: Path, overrides: list[str]
) -> list[dict]:
    out = work / f"staleness{k}"
    cmd = [
        "taskset",
        "-c",
        trainer_cores,
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        str(CONFIG),
        "--output-dir",
        str(out),
        f"train.steps={steps}",
        "rollout.backend=sglang",
        f"rollout.server_urls=[{url}]",
        f"rollout.max_staleness={k}",
        "optim.warmup_steps=0",
        "eval.every_steps=0",
        "eval.k=1",
        "checkpoint.every_steps=0",
        "checkpoint.resume=none",
        "checkpoint.save_hf_final=false",
        "logging.plot=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        f"rollout.api_key_file={key_file}",  # the server's key: one for every run of the benchmark
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(len(trainer_cores.split(","))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"the run with max_staleness={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]


def phases(rows: list[dict]) -> dict:
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    step = mean("step_s")
    return {
        "step_s": step,
        "generation_s": mean("generate_s") + mean("reward_s"),
        "sync_s": mean("sync_s"),
        "training_s": step - mean("trainer_wait_s") - mean("sync_s"),
        "trainer_wait_s": mean("trainer_wait_s"),
        "fleet_wait_s": mean("fleet_wait_s"),
        "overlap": mean("overlap"),
        "staleness_mean": mean("staleness_mean"),
        "staleness_max": max(r["staleness_max"] for r in rows),
        "batches_per_hour": 3600 / step,
    }


def table(results: dict[int, dict]) -> str:
    base = results[min(results)]
    cols = [
        "max_staleness",
        "batches/h",
        "vs sync",
        "step s",
        "generation s",
        "training s",
        "sync s",
        "trainer wait s",
        "fleet wait s",
        "overlap",
        "staleness mean/max",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k, r in sorted(results.items()):
        lines.append(
            f"| {k} | {r['batches_per_hour']:.0f} | {r['batches_per_hour'] / base['batches_per_hour']:.2f}x | "
            f"{r['step_s']:.2f} | {r['generation_s']:.2f} | {r['training_s']:.2f} | {r['sync_s']:.2f} | "
            f"{r['trainer_wait_s']:.2f} | {r['fleet_wait_s']:.2f} | {r['overlap']:.2f} | "
            f"{r['staleness_mean']:.2f} / {r['staleness_max']:.0f} |"
        )
    ideal = 3600 / (max(base["generation_s"], base["training_s"]) + base["sync_s"])  # the fleet pauses for the sync
    lines.append(
        f"| ideal (from the max_staleness={min(results)} phases) | {ideal:.0f} | "
        f"{ideal / base['batches_per_hour']:.2f}x | | | | | | | 1.00 | |"
    )
    return "\n".join(lines)


def projection() -> str:
    g, t, s = PROJECTION["generation_s"], PROJECTION["training_s"], PROJECTION["sync_s"]
    sync, overlapped = g + t + s, max(g, t) + s  # the fleet pauses for each sync
    return "\n".join(
        [
            "PROJECTION (not measured): DeepSeek-R1-Distill-Qwen-1.5B, one node of 8 x 80 GB, 4 GPUs training, 4 serving",
            f"  assumed: {PROJECTION['batch']}; generation {g:.0f} s, training {t:.0f} s, weight sync {s:.0f} s per batch",
            "| max_staleness | batches/h | vs sync |",
            "|---|---|---|",
            f"| 0 | {3600 / sync:.1f} | 1.00x |",
            f"| >= 1 | {3600 / overlapped:.1f} | {sync / overlapped:.2f}x |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="RL steps per run (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-async"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args()
    from real_megatron.config import load_config
    from real_megatron.rollout.fleet_auth import ensure_run_key, read_key_file
    from real_megatron.rollout.sglang_fleet import SGLangFleet
    from real_megatron.tasks.inputs import initial_model_dir, prepare_inputs

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG, ["rollout.backend=sglang", *args.overrides])  # as every run: the fleet's settings
    prepare_inputs(cfg)  # the warm-start model (cached) the server starts from
    key_file = ensure_run_key(work)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("the benchmark splits the machine between the server and the trainer: it needs 2 cores")
    trainer_cores = ",".join(map(str, cores[:-1]))
    env = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(ROOT / "tests" / "support"), "OMP_NUM_THREADS": "1"}
    with SGLangFleet(
        model_path=str(initial_model_dir(cfg)),
        num_servers=1,
        base_port=cfg.rollout.server_base_port,
        server_python=server_python_on_core(cores[-1], work),
        server_args=CPU_SERVER_ARGS,
        env=env,
        log_dir=work / "logs",
        health_timeout_s=600,
        max_requests_per_server=256,
        api_key=read_key_file(key_file),
        key_source=str(key_file),
    ) as fleet:
        results = {}
        for k in args.staleness:
            rows = run(
                k, args.steps + args.warmup, fleet.servers[0].url, work, trainer_cores, key_file, args.overrides
            )[args.warmup :]
            results[k] = phases(rows)
            print(f"max_staleness={k}: {results[k]['batches_per_hour']:.0f} batches/h", flush=True)
    report = (
        f"rollout batches per hour, quickstart ({cfg.train.prompts_per_step} prompts x {cfg.rollout.n_samples} "
        f"samples) through one SGLang server on core "
        f"{cores[-1]}, trainer on core(s) {trainer_cores}, {args.steps} timed steps each\n{table(results)}\n\n"
        f"{projection()}"
    )
    print(report)
    (work / "report.md").write_text(report + "\n")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
