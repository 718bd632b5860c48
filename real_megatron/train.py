"""REAL training, Algorithm 1: generate -> verify -> update the actor -> sync weights -> evaluate.

    for step:
        prompts  <- next P prompts of the (resumable, shuffled) dataset
        rollouts <- G samples per prompt from the engine (embedded, or the SGLang fleet)
        labels   <- verifier(rollout, ground truth) in {0, 1}
        actor.train_step(rollouts): old log-probs, then REAL over group-aligned micro-batches
        engine   <- actor's new weights (streaming export)
        log metrics; evaluate and checkpoint every so often
With rollout.max_staleness = k >= 1 the fleet generates ahead, k versions at most (rollout/pipeline.py).
Colocated (rollout.colocate), the servers release their GPU memory before the actor trains and the
actor moves out before they take the new weights (rollout/weight_sync.py, TensorWeights).

The run's objects are built once, from the config, by run.build_run; this loop talks to them only.
Everything a run leaves is in its output directory: config.yaml, initial_model.json (what it began
from), metrics.jsonl, TensorBoard events, checkpoints/, final_hf/, summary.json and curves.png.
"""

from __future__ import annotations

import time

from .config import Config
from .kill_points import kill_point
from .rollout.weight_sync import colocation_phases, release_for_training
from .run import build_run


def train(cfg: Config) -> dict:
    run = build_run(cfg)  # actor, engine (holding the actor's weights), rollouts, evaluator, checkpoints, logs
    if "baseline" not in run.history:  # pass@1 before RL (a resumed run measured it already)
        run.history["baseline"] = run.evaluate(0, "baseline evaluation")
        run.log.metrics(
            run.start_step, {"val_pass1": run.history["baseline"]["pass1"], "eval_s": run.history["baseline"]["eval_s"]}
        )
    run.begin_steps()
    for step in range(run.start_step + 1, run.last_step + 1):
        step_start = time.perf_counter()
        # prompts -> G samples each -> labels; with dynamic sampling, rounds until the groups are informative
        batch = run.rollouts.batch(step)
        kill_point("after_rollouts", step)
        release_for_training(run.engine, run.actor)  # colocated: the servers' memory out, the actor's back
        metrics = run.actor.train_step(batch.rollouts, step=step)  # old log-probs, then the objective's updates
        kill_point("after_update", step)
        metrics.update(batch.metrics)
        run.log.rollouts(step, batch.rollouts)
        sync_start = time.perf_counter()
        run.engine.load_weights(run.actor, step)  # later samples are drawn with weights version `step`
        metrics["sync_s"] = time.perf_counter() - sync_start
        metrics.update(colocation_phases(run.engine))  # release, onload, offload, resume, weight update
        metrics["step_s"] = time.perf_counter() - step_start  # one rollout batch, evaluation excluded
        if run.evaluate.due(step):
            metrics["val_pass1"] = run.evaluate(step, f"evaluation after step {step}")["pass1"]
        run.log.metrics(step, metrics)
        kill_point("after_log", step)
        run.log.progress(metrics)
        stopping = run.guard.should_stop()  # a cluster signal on any rank: all stop after this step
        if stopping or run.checkpoints.due(step):
            run.save_checkpoint(step, {"step": step, "data": batch.data_state, "history": run.history})
        if stopping and step < run.last_step:
            return run.stop_for_requeue(step)
    run.end_steps()
    return run.finish(run.evaluate(run.last_step, "final evaluation"))
