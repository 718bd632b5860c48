#!/usr/bin/env python
"""Seconds per RL step (one rollout batch: generation, old log-probs, updates) of the quickstart
setup, real-megatron against TRL's GRPOTrainer, in the same run on the same machine.

    .venv/bin/pip install -c .venv/torch-constraint.txt -e '.[bench]'   # TRL, beside torch 2.13.0+cpu
    .venv/bin/python tools/bench_trainer.py [--steps 10] [--warmup 2] [KEY=VALUE ...]

Both sides get the same warm-start model, tokenizer and training prompts (the quickstart task),
G=8 samples of 32 prompts (256 completions of at most rollout.max_new_tokens tokens, temperature 1),
two policy updates per rollout batch on the whole batch (TRL: num_iterations=2, which also makes it
compute old log-probs), lr 3e-4, no KL, fp32, the same torch threads. Each side runs in its own
process, one after the other; the first --warmup rollout batches are not timed. KEY=VALUE
overrides of the quickstart config apply to both sides (a smaller batch, a cache folder).
TRL's phases: "generation" is its _generate_and_score_completions (sampling, rewards, old
log-probs); "updates" the rest of its steps. real-megatron's phases come from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def run_ours(steps: int, warmup: int, work: Path, overrides: list[str]) -> dict:
    run = work / "ours"
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        str(CONFIG),
        "--output-dir",
        str(run),
        f"train.steps={steps + warmup}",
        "optim.warmup_steps=0",
        "eval.every_steps=0",
        "eval.k=1",
        "checkpoint.every_steps=0",
        "checkpoint.save_hf_final=false",
        "logging.plot=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"real-megatron run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "step_s" in r][warmup:]
    mean = lambda key: statistics.mean(r[key] for r in timed)  # noqa: E731
    return {
        "step_s": mean("step_s"),
        "generation_s": mean("generate_s") + mean("reward_s"),
        "old_logprobs_s": mean("old_logprobs_s"),
        "updates_s": mean("update_s"),
        "sync_s": mean("sync_s"),
        "completion_tokens": mean("response_length_mean"),
        "steps": len(timed),
    }


def run_trl(steps: int, warmup: int, work: Path, overrides: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-worker", str(work), "--steps", str(steps), "--warmup", str(warmup)]
        + overrides,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return json.loads((work / "trl.json").read_text())


def trl_worker(work: Path, steps: int, warmup: int, overrides: list[str]) -> None:
    """In its own process: GRPOTrainer on the quickstart's model, prompts and reward."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from real_megatron.config import load_config
    from real_megatron.tasks import arithmetic as task
    from real_megatron.tasks.inputs import task_root

    cfg = load_config(CONFIG, overrides)
    root = task_root(cfg)
    model_dir = root / "warmstart"  # written by the real-megatron run before this one
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    r, t = cfg.rollout, cfg.train

    def reward(prompts, completions, answer, **kwargs):
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    batch = t.prompts_per_step * r.n_samples
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=batch,
        generation_batch_size=batch,
        num_generations=r.n_samples,
        num_iterations=cfg.algorithm.updates_per_batch,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.clip_grad,
        beta=0.0,
        max_steps=(steps + warmup) * cfg.algorithm.updates_per_batch,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=cfg.train.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=True,
        loss_type="grpo",
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(prompts),
        processing_class=tokenizer,
    )
    marks, gen_times, lengths = [], [], []
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        gen_times.append(time.perf_counter() - start)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate_and_score_completions = timed_generate

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    marks.append(time.perf_counter())
    trainer.train()
    per = cfg.algorithm.updates_per_batch
    batches = [marks[i + per] - marks[i] for i in range(0, len(marks) - per, per)][warmup:]
    generation = statistics.mean(gen_times[warmup:])
    step = statistics.mean(batches)
    (work / "trl.json").write_text(
        json.dumps(
            {
                "step_s": step,
                "generation_s": generation,
                "updates_s": step - generation,
                "completion_tokens": statistics.mean(lengths[warmup:]),
                "steps": len(batches),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed rollout batches per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rollout batches first")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="quickstart config overrides, both sides")
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(Path(args.trl_worker), args.steps, args.warmup, args.overrides)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "TRL is not installed: .venv/bin/pip install -c .venv/torch-constraint.txt -e '.[bench]'"
        ) from err
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = run_ours(args.steps, args.warmup, work, args.overrides)
        theirs = run_trl(args.steps, args.warmup, work, args.overrides)
    rows = [
        ("generation + rewards", ours["generation_s"], theirs["generation_s"]),
        ("old log-probs", ours["old_logprobs_s"], None),
        ("policy updates", ours["updates_s"], theirs["updates_s"]),
        ("weight sync", ours["sync_s"], None),
        ("seconds per rollout batch", ours["step_s"], theirs["step_s"]),
    ]
    print(
        f"quickstart setup, {ours['steps']} timed rollout batches each, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"mean completion tokens: real-megatron {ours['completion_tokens']:.1f}, TRL {theirs['completion_tokens']:.1f}"
    )
    print("| phase | real-megatron s | TRL GRPOTrainer s | real-megatron / TRL |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        shown_b = f"{b:.3f}" if b is not None else "(in generation)" if name == "old log-probs" else "-"
        ratio = f"{a / b:.2f}" if b else ""
        print(f"| {name} | {a:.3f} | {shown_b} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
