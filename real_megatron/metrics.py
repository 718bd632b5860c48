"""Run metrics: one JSON line per step (metrics.jsonl), TensorBoard scalars, Weights & Biases and
MLflow when asked, and the training-curve PNG.

Where each lives (the run directory is train.output_dir):
- metrics.jsonl and tensorboard/ in the run directory;
- Weights & Biases (`logging.wandb`, the wandb package): project $WANDB_PROJECT or "real-megatron",
  the run named after the run directory; its local files in <run dir>/wandb (WANDB_MODE=offline
  keeps them there, for `wandb sync` later);
- MLflow (`logging.mlflow`, the mlflow or mlflow-skinny package): the server $MLFLOW_TRACKING_URI,
  else a file store in <run dir>/mlruns (`mlflow ui --backend-store-uri <run dir>/mlruns`);
  experiment $MLFLOW_EXPERIMENT_NAME or "real-megatron".
A resumed run logs into the same W&B and MLflow runs (their ids are kept in the run directory).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
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


def _need(package: str, key: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise RuntimeError(
            f"{key}: true needs the {package} package in this environment (pip install {pip_name}): {exc}"
        ) from exc


def _kept_id(path: Path, make) -> str:
    """The id saved at path (a resumed run continues its tracker run), or a new one saved there."""
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    new = make()
    path.write_text(new + "\n")
    return new


class WandbLog:
    """The step metrics to a Weights & Biases run (offline with WANDB_MODE=offline)."""

    def __init__(self, run_dir: Path, config: dict):
        wandb = _need("wandb", "logging.wandb", "wandb")
        run_id = _kept_id(run_dir / "wandb_run_id", lambda: uuid.uuid4().hex[:8])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "real-megatron",
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLog:
    """The step metrics to an MLflow run (a file store in the run directory unless
    MLFLOW_TRACKING_URI names a server); the config as its parameters."""

    def __init__(self, run_dir: Path, config: dict):
        mlflow = _need("mlflow", "logging.mlflow", "mlflow-skinny")
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store, in maintenance, behind this switch
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "real-megatron"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)

        def new_run() -> str:
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(run_id, params=params[i : i + 100])
            return run_id

        self.run_id = _kept_id(run_dir / "mlflow_run_id", new_run)

    def log(self, step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        *,
        wandb: bool = False,
        mlflow: bool = False,
        config: dict | None = None,
    ):
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
        self.trackers = [cls(self.run_dir, config or {}) for on, cls in ((wandb, WandbLog), (mlflow, MlflowLog)) if on]

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, clean)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()


def plot_curves(metrics_file: str | Path, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    curves = CURVES
    if any("tool_calls_mean" in r for r in rows):  # a tool-using run: its tool calls beside pass@1
        curves = (*CURVES, ("tool_calls_mean", "tool calls per trajectory"))
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, (key, label) in zip(axes, curves):
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
