"""REAL training, Algorithm 1: generate -> verify -> update the actor -> sync weights -> evaluate.

    for step:
        prompts  <- next P prompts of the (resumable, shuffled) dataset
        rollouts <- G samples per prompt from the engine (embedded, or the SGLang fleet)
        labels   <- verifier(rollout, ground truth) in {0, 1}
        actor.train_step(rollouts): old log-probs, then REAL over group-aligned micro-batches
        engine   <- actor's new weights (streaming export)
        log metrics; evaluate and checkpoint every so often
With rollout.max_staleness = k >= 1 the fleet generates ahead, k versions at most (rollout/pipeline.py).

Everything a run leaves is in its output directory: config.yaml, initial_model.json (what it began
from), metrics.jsonl, TensorBoard events,
checkpoints/, final_hf/, summary.json and curves.png.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import Config, save_config
from .evaluation import evaluate, run_summary
from .kill_points import kill_point
from .memory import checkpoint_optimizer_format
from .rank0_phases import is_rank0, on_rank0
from .rollout.engine_setup import close_engine, make_broadcaster, make_engine, sync_weights
from .rollout.pipeline import RolloutSource
from .tasks.inputs import prepare_inputs, warmstart_record

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    from .actor.actor import Actor, ActorSettings
    from .actor.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
    from .actor.distributed import init_distributed, shutdown
    from .actor.model import ArchSpec
    from .actor.reference import record_initial_model, recorded_initial_model
    from .convert.hf_io import HFCheckpointReader
    from .metrics import MetricsLogger, RolloutLog, plot_curves
    from .objectives import objective_from_config
    from .preemption import PreemptionGuard

    p, t = cfg.parallel, cfg.train
    init_distributed(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, timeout_s=p.timeout_s,
                     expected_world_size=p.world_size, seed=t.seed, ep=p.ep, etp=p.etp)
    run_dir, started = Path(t.output_dir), time.time()
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    if is_rank0():
        save_config(cfg, run_dir / "config.yaml")

    inputs = prepare_inputs(cfg)
    spec = ArchSpec.from_pretrained(inputs.model_dir)
    resume = None if cfg.checkpoint.resume == "none" else (
        latest_checkpoint(ckpt_root) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume))
    if resume is None and is_rank0():
        record_initial_model(run_dir, inputs.model_dir)  # what a resumed run's reference model is rebuilt from
    # kl='reference': the run's initial model, also after a resume (not the checkpoint's weights)
    reference = None if cfg.algorithm.kl != "reference" else HFCheckpointReader(
        recorded_initial_model(run_dir) if resume is not None else inputs.model_dir, spec).get
    optimizer_format = checkpoint_optimizer_format(cfg)
    actor = Actor(spec, ActorSettings.from_config(cfg, pad_id=inputs.tokenizer.pad_token_id or 0),
                  objective_from_config(cfg.algorithm), HFCheckpointReader(inputs.model_dir, spec).get, reference)
    engine = on_rank0("starting the rollout engine", lambda: make_engine(cfg, inputs, run_dir), timeout_s=p.timeout_s,
                      share=False)

    start_step, history = 0, {}
    if resume is not None:
        state = load_checkpoint(actor, resume)
        start_step, history = state["step"], state.get("history", {})
        inputs.train_set.load_state_dict(state["data"])
        if is_rank0():
            log.info("resumed from %s at step %d", resume, start_step)
    # a fresh start (no checkpoint yet, even after a crash) replaces what an earlier attempt logged
    logged_until = start_step if resume is not None else -1
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, resume_step=logged_until) if is_rank0() else None
    rollout_log = RolloutLog(run_dir, inputs.tokenizer, logged_until) if is_rank0() and cfg.logging.rollouts else None
    guard = PreemptionGuard()
    broadcaster = make_broadcaster(cfg, engine)
    sync_weights(actor, engine, run_dir, start_step, inputs.model_dir, cfg, broadcaster)

    def evaluation(step: int, name: str) -> dict:  # held-out pass@1, on rank 0
        return on_rank0(name, lambda: evaluate(engine, inputs, cfg, step), timeout_s=p.timeout_s)

    if "baseline" not in history:
        history["baseline"] = evaluation(0, "baseline evaluation")
        if logger:
            logger.log(start_step, {"val_pass1": history["baseline"]["pass1"], "eval_s": history["baseline"]["eval_s"]})
    source = RolloutSource(engine, inputs, cfg, start_step, t.steps) if is_rank0() else None  # after the sync
    bar = _progress(cfg, start_step)
    for step in range(start_step + 1, t.steps + 1):
        step_start = time.perf_counter()
        # prompts -> G samples each -> labels; with dynamic sampling, rounds until the groups are informative
        batch = on_rank0(f"rollouts of step {step}", lambda: source.batch(step), timeout_s=p.timeout_s)
        kill_point("after_rollouts", step)
        metrics = actor.train_step(batch.rollouts, step=step)
        kill_point("after_update", step)
        metrics.update(batch.metrics)
        if rollout_log:
            rollout_log.log(step, batch.rollouts)
        metrics["sync_s"] = sync_weights(actor, engine, run_dir, step, inputs.model_dir, cfg, broadcaster)
        metrics["step_s"] = time.perf_counter() - step_start  # one rollout batch, evaluation excluded
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < t.steps:
            metrics["val_pass1"] = evaluation(step, f"evaluation after step {step}")["pass1"]
        if logger:
            logger.log(step, metrics)
        kill_point("after_log", step)
        if bar is not None:
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")  # this step's
            bar.update(1)
        stopping = guard.should_stop()  # a cluster signal on any rank: all stop after this step
        if stopping or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            save_checkpoint(actor, ckpt_root / f"step_{step:06d}",
                            {"step": step, "data": batch.data_state, "history": history},
                            optimizer_format)
            prune_checkpoints(ckpt_root, cfg.checkpoint.keep_last)
        if stopping and step < t.steps:
            if is_rank0():
                log.warning("stopped at step %d with a checkpoint in %s, for a requeue", step, ckpt_root)
            _close([bar, logger, rollout_log, source], engine, broadcaster)
            shutdown()
            return {"preempted_at": step}
    _close([bar, source], None)

    final = evaluation(t.steps, "final evaluation")
    if cfg.checkpoint.save_hf_final:
        from .convert.convert import write_hf_checkpoint

        write_hf_checkpoint(actor.chunks, spec, run_dir / "final_hf", inputs.model_dir, actor.settings.dtype)
    summary = run_summary(cfg, history["baseline"], final, time.time() - started, warmstart_record(cfg, inputs))
    if is_rank0():
        logger.log(t.steps, {"val_pass1": final["pass1"]})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _close([logger, rollout_log], engine, broadcaster)
    if is_rank0() and cfg.logging.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.algorithm.name} on {run_dir.name}")
    shutdown()
    guard.restore()
    return summary


def _close(closables: list, engine, broadcaster=None) -> None:
    for closable in closables:
        if closable is not None:
            closable.close()
    if engine is not None:
        close_engine(engine, broadcaster)


def _progress(cfg: Config, start: int):
    if not (cfg.logging.progress_bar and is_rank0()):
        return None
    from .progress import progress

    return progress(total=cfg.train.steps, initial=start, desc=f"{cfg.algorithm.name} RL", unit="step")
