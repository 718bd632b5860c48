"""The run, built once: `build_run` turns a config into the objects the training loop talks to
(train.py): the actor, the engine, the rollout batches, the evaluator, the checkpointer and the
loggers. Each gets its own section of the config, or the facts of it it needs; the loop gets no
config at all.

Every trainer rank builds the same Run; what only rank 0 does (generating, evaluating, logging)
is inside the objects, which hand the other ranks rank 0's results (rank0_phases.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .actor.actor import Actor, ActorSettings
from .actor.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .actor.distributed import init_distributed, shutdown
from .actor.model import ArchSpec
from .actor.reference import record_initial_model, recorded_initial_model
from .config import Config, config_to_dict, save_config
from .convert.convert import write_hf_checkpoint
from .convert.hf_io import HFCheckpointReader
from .evaluation import EvalConfig, evaluate, run_summary
from .memory import checkpoint_optimizer_format
from .metrics import MetricsLogger, RolloutLog, plot_curves
from .objectives.registry import objective_from_config
from .preemption import PreemptionGuard
from .progress import progress
from .rank0_phases import on_rank0
from .ranks import is_rank0
from .rollout.collect import make_trajectory_runner
from .rollout.engines import build_engine
from .rollout.pipeline import RolloutBatch, RolloutSource
from .rollout.types import Engine
from .rollout.weight_sync import colocated, release_for_training
from .tasks.inputs import Inputs, prepare_inputs, warmstart_record

log = logging.getLogger(__name__)


class Rollouts:
    """Each step's rollout batch: made on rank 0 (RolloutSource: on demand, or generated ahead),
    handed to every rank."""

    def __init__(self, make_source, timeout_s: float):
        self.make_source, self.timeout_s, self.source = make_source, timeout_s, None

    def start(self) -> None:
        """Once the engine holds the start weights: with rollout.max_staleness >= 1 generating ahead begins."""
        self.source = self.make_source() if is_rank0() else None

    def batch(self, step: int) -> RolloutBatch:
        return on_rank0(f"rollouts of step {step}", lambda: self.source.batch(step), timeout_s=self.timeout_s)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class Evaluator:
    """Held-out pass@1 on rank 0 (the others wait, then share it): before RL, every eval.every_steps
    steps, and after the last step."""

    def __init__(
        self,
        engine: Engine,
        inputs: Inputs,
        settings: EvalConfig,
        *,
        seed: int,
        verifier_timeout_s: float,
        last_step: int,
        timeout_s: float,
        runner=None,
    ):
        """runner: multi-turn runs' rollout loop (rollout/collect.make_trajectory_runner); None: single-turn."""
        self.engine, self.inputs, self.eval = engine, inputs, settings  # the `eval` section
        self.runner = runner
        self.seed, self.verifier_timeout_s, self.last_step, self.timeout_s = (
            seed,
            verifier_timeout_s,
            last_step,
            timeout_s,
        )

    def due(self, step: int) -> bool:
        """A mid-run evaluation after `step` (the final one is the loop's own)."""
        return bool(self.eval.every_steps) and step % self.eval.every_steps == 0 and step < self.last_step

    def __call__(self, step: int, phase: str) -> dict:
        return on_rank0(
            phase,
            lambda: evaluate(
                self.engine,
                self.inputs,
                self.eval,
                step,
                seed=self.seed,
                verifier_timeout_s=self.verifier_timeout_s,
                runner=self.runner,
            ),
            timeout_s=self.timeout_s,
        )


class Checkpointer:
    """Checkpoints every checkpoint.every_steps steps (and when the cluster asks), keeping the last
    checkpoint.keep_last; `resume` is the one this run starts from (None: a fresh start)."""

    def __init__(self, root: Path, every_steps: int, keep_last: int, resume: str, optimizer_format: str):
        self.root, self.every, self.keep_last, self.optimizer_format = root, every_steps, keep_last, optimizer_format
        self.resume = None if resume == "none" else latest_checkpoint(root) if resume == "auto" else Path(resume)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, actor: Actor, step: int, state: dict) -> None:
        save_checkpoint(actor, self.root / f"step_{step:06d}", state, self.optimizer_format)
        prune_checkpoints(self.root, self.keep_last)


class RunLog:
    """What rank 0 writes as the run goes: metrics.jsonl (and TensorBoard), rollouts.jsonl when
    asked, the progress bar; nothing on the other ranks."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, logged_until: int, start_step: int):
        rank0 = is_rank0()
        self.metrics_log = (
            MetricsLogger(
                run_dir,
                tensorboard=cfg.logging.tensorboard,
                resume_step=logged_until,
                wandb=cfg.logging.wandb,
                mlflow=cfg.logging.mlflow,
                config=config_to_dict(cfg),
            )
            if rank0
            else None
        )
        self.rollout_log = RolloutLog(run_dir, tokenizer, logged_until) if rank0 and cfg.logging.rollouts else None
        self.bar_wanted = rank0 and cfg.logging.progress_bar
        self.total, self.start_step, self.desc = cfg.train.steps, start_step, f"{cfg.algorithm.name} RL"
        self.bar = None

    def start_progress(self) -> None:
        if self.bar_wanted:
            self.bar = progress(total=self.total, initial=self.start_step, desc=self.desc, unit="step")

    def metrics(self, step: int, metrics: dict) -> None:
        if self.metrics_log:
            self.metrics_log.log(step, metrics)

    def rollouts(self, step: int, rollouts: list) -> None:
        if self.rollout_log:
            self.rollout_log.log(step, rollouts)

    def progress(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")  # this step's
            self.bar.update(1)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_progress()
        for log_ in (self.metrics_log, self.rollout_log):
            if log_ is not None:
                log_.close()


@dataclass
class Run:
    actor: Actor
    engine: Engine
    rollouts: Rollouts
    evaluate: Evaluator
    checkpoints: Checkpointer
    log: RunLog
    guard: PreemptionGuard  # a cluster's signal on any rank: every rank stops after the same step
    start_step: int  # 0, or the step of the checkpoint resumed from
    last_step: int
    history: dict  # what checkpoints keep beside the step: the baseline evaluation
    # for the end of the run
    cfg: Config
    inputs: Inputs
    spec: ArchSpec
    run_dir: Path
    started: float

    def begin_steps(self) -> None:
        """The engine holds the start weights and the baseline is measured: generation may run ahead."""
        self.rollouts.start()
        self.log.start_progress()

    def save_checkpoint(self, step: int, state: dict) -> None:
        """The actor's checkpoint at `step`. Colocated, the actor's state is in host memory between
        steps: the servers release their memory, the actor comes back for the save, and the servers
        get their memory and the same weights back afterwards."""
        if not colocated(self.engine):
            self.checkpoints.save(self.actor, step, state)
            return
        release_for_training(self.engine, self.actor)
        self.checkpoints.save(self.actor, step, state)
        self.engine.load_weights(self.actor, step)

    def stop_for_requeue(self, step: int) -> dict:
        """After a cluster's signal: the checkpoint of `step` is saved; close everything for a requeue."""
        if is_rank0():
            log.warning("stopped at step %d with a checkpoint in %s, for a requeue", step, self.checkpoints.root)
        self.log.close()
        self.rollouts.close()
        self.engine.close()
        shutdown()
        return {"preempted_at": step}

    def end_steps(self) -> None:
        self.log.close_progress()
        self.rollouts.close()

    def finish(self, final: dict) -> dict:
        """The final model (HF), summary.json, the curves; everything closed. Returns the summary."""
        cfg, run_dir = self.cfg, self.run_dir
        if cfg.checkpoint.save_hf_final:
            release_for_training(self.engine, self.actor)  # colocated: the actor's weights back first
            write_hf_checkpoint(
                self.actor.chunks, self.spec, run_dir / "final_hf", self.inputs.model_dir, self.actor.settings.dtype
            )
        summary = run_summary(
            cfg, self.history["baseline"], final, time.time() - self.started, warmstart_record(cfg, self.inputs)
        )
        if is_rank0():
            self.log.metrics(self.last_step, {"val_pass1": final["pass1"]})
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.log.close()
        self.engine.close()
        if is_rank0() and cfg.logging.plot:
            plot_curves(
                run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.algorithm.name} on {run_dir.name}"
            )
        shutdown()
        self.guard.restore()
        return summary


def build_run(cfg: Config) -> Run:
    """Everything a run talks to, from its config, on every trainer rank (collectives inside): the
    process groups, the inputs (a task made or files read), the actor (from the model, or resumed
    from the latest checkpoint), the engine holding the actor's weights, and the rest."""
    p, t = cfg.parallel, cfg.train
    init_distributed(
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        cp=p.cp,
        timeout_s=p.timeout_s,
        expected_world_size=p.world_size,
        seed=t.seed,
        ep=p.ep,
        etp=p.etp,
    )
    run_dir, started = Path(t.output_dir), time.time()
    if is_rank0():
        save_config(cfg, run_dir / "config.yaml")

    inputs = prepare_inputs(cfg)
    spec = ArchSpec.from_pretrained(inputs.model_dir)
    checkpoints = Checkpointer(
        Path(cfg.checkpoint.dir or run_dir / "checkpoints"),
        cfg.checkpoint.every_steps,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.resume,
        checkpoint_optimizer_format(cfg),
    )
    resume = checkpoints.resume
    if resume is None and is_rank0():
        record_initial_model(run_dir, inputs.model_dir)  # what a resumed run's reference model is rebuilt from
    # kl='reference': the run's initial model, also after a resume (not the checkpoint's weights)
    reference = (
        None
        if cfg.algorithm.kl != "reference"
        else HFCheckpointReader(recorded_initial_model(run_dir) if resume is not None else inputs.model_dir, spec).get
    )
    actor = Actor(
        spec,
        ActorSettings.from_config(cfg, pad_id=inputs.tokenizer.pad_token_id or 0),
        objective_from_config(cfg.algorithm),
        HFCheckpointReader(inputs.model_dir, spec).get,
        reference,
    )
    engine = build_engine(cfg, inputs, run_dir)  # rank 0's generates; every rank's takes its part in loading weights

    start_step, history = 0, {}
    if resume is not None:
        state = load_checkpoint(actor, resume)
        start_step, history = state["step"], state.get("history", {})
        inputs.train_set.load_state_dict(state["data"])
        if is_rank0():
            log.info("resumed from %s at step %d", resume, start_step)
    # a fresh start (no checkpoint yet, even after a crash) replaces what an earlier attempt logged
    logged_until = start_step if resume is not None else -1
    run_log = RunLog(cfg, run_dir, inputs.tokenizer, logged_until, start_step)
    guard = PreemptionGuard()
    engine.load_weights(actor, start_step)
    rollouts = Rollouts(lambda: RolloutSource(engine, inputs, cfg, start_step, t.steps), timeout_s=p.timeout_s)
    evaluator = Evaluator(
        engine,
        inputs,
        cfg.eval,
        seed=t.seed,
        verifier_timeout_s=cfg.data.verifier_timeout_s,
        last_step=t.steps,
        timeout_s=p.timeout_s,
        runner=make_trajectory_runner(inputs, cfg),
    )
    return Run(
        actor=actor,
        engine=engine,
        rollouts=rollouts,
        evaluate=evaluator,
        checkpoints=checkpoints,
        log=run_log,
        guard=guard,
        start_step=start_step,
        last_step=t.steps,
        history=history,
        cfg=cfg,
        inputs=inputs,
        spec=spec,
        run_dir=run_dir,
        started=started,
    )
