"""Run metrics: one JSON line per step, TensorBoard scalars, and the training-curve PNG."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

CURVES = (
    ("reward_mean", "reward"),
    ("entropy", "entropy"),
    ("val_pass1", "validation pass@1"),
    ("solved_all_ratio", "solved-all ratio"),
)


def _parse(line: str) -> dict | None:
    """One complete JSON line, or None (blank, or cut short by a kill)."""
    if not line.endswith("\n"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log after `step` (and a line cut short by a kill), atomically."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines(keepends=True)
        if (row := _parse(line)) is not None and row["step"] <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class RolloutLog:
    """`logging.rollouts`: rollouts.jsonl, one line per rollout trained on (step, prompt's file:row,
    the weight version it was sampled with, label, response length and text; multi-turn runs: the
    turns with their roles, the model's token count and how the trajectory ended), for reading what
    the policy wrote and checking which prompts each step used."""

    def __init__(self, run_dir: str | Path, tokenizer, resume_step: int):
        path = Path(run_dir) / "rollouts.jsonl"
        keep_steps_up_to(path, resume_step)
        self.file, self.tokenizer = path.open("a"), tokenizer

    def log(self, step: int, rollouts) -> None:
        for r in rollouts:
            row = {
                "step": step,
                "group": r.group,
                "source": r.source,
                "weight_version": r.weight_version,
                "reward": r.reward,
                "in_loss": r.in_loss,
                "truncated": r.truncated,
                "response_tokens": len(r.response_ids),
                "response": self.tokenizer.decode(r.response_ids, skip_special_tokens=True),
            }
            if r.turns is not None:  # multi-turn: the conversation, each message with its role
                row["turns"] = r.turns
                row["model_tokens"] = r.num_model_tokens
                row["finish"] = r.stats.get("finish", "")
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        """resume_step: the step the run continues from (-1: a fresh start). What was logged after
        it goes (a crash between checkpoints would otherwise log those steps twice), and so does a
        line cut short by a kill mid-write."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            keep_steps_up_to(path, resume_step)
        self.file = path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_file: str | Path, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, label) in zip(axes, CURVES):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, linewidth=1.2)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
