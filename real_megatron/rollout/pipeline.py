"""Where each step's rollout batch comes from: generated on demand, or ahead with bounded staleness.

`rollout.max_staleness: 0` (the default) is Algorithm 1 as written: the trainer asks for step s's
batch, the engine generates it with weights version s-1 (the weights after step s-1), then the
actor trains. With k >= 1 a generator thread on rank 0 runs ahead: step s's batch starts as soon as
the fleet holds weights version s-1-k, so it is generated while the actor trains on steps before s,
and every rollout the actor trains on at step s (weights s-1) was sampled at most k versions ago.
The bound is checked again when a batch is taken: a rollout sampled earlier than that (only if
something else went wrong) is kept out of the loss and counted (`stale_dropped`).

The old policy pi_old is the actor's own recomputation either way (its first update has s̄ = 0);
the engine's log-probs feed the mismatch metrics and, when asked for, the importance correction
(algorithm.importance_correction; per token inside s̄ with algorithm.importance_unit=token).

Exact resume: batches are drawn from the dataset order in step order, and each remembers the data
position after its prompts. A checkpoint at step s saves the position after step s's batch, so the
batches generated ahead and lost with a crash are drawn again, from the same prompts, when the run
resumes: every prompt of the order is trained on once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..errors import UserError
from .collect import collect_rollouts, make_trajectory_runner

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    pass


@dataclass
class RolloutBatch:
    step: int
    rollouts: list
    metrics: dict
    data_state: dict  # the dataset position after this batch's prompts (what a checkpoint at `step` keeps)
    generation_s: float  # from its first prompt drawn to its last label, waits for weights excluded


class RolloutSource:
    """Rank 0: the rollout batch of each step from start_step + 1 to last_step, in order."""

    def __init__(self, engine, inputs, cfg, start_step: int, last_step: int):
        self.engine, self.inputs, self.cfg = engine, inputs, cfg
        self.runner = make_trajectory_runner(inputs, cfg)  # multi-turn runs only
        self.max_staleness = cfg.rollout.max_staleness
        self._stop = threading.Event()
        self._ready: queue.Queue = queue.Queue()
        self._thread = None
        if self.max_staleness > 0:
            self._thread = threading.Thread(
                target=self._generate_ahead, args=(start_step + 1, last_step), name="rollout-generator", daemon=True
            )
            self._thread.start()

    def _collect(self, step: int) -> RolloutBatch:
        start = time.perf_counter()
        rollouts, metrics = collect_rollouts(self.engine, self.inputs, self.cfg, step, self.runner)
        return RolloutBatch(step, rollouts, metrics, self.inputs.train_set.state_dict(), time.perf_counter() - start)

    def _generate_ahead(self, first: int, last: int) -> None:
        try:
            for step in range(first, last + 1):
                waited = time.perf_counter()
                while self.engine.weight_version < step - 1 - self.max_staleness:  # weights too old for step
                    if self._stop.wait(0.02):
                        return
                waited = time.perf_counter() - waited
                if self._stop.is_set():
                    return
                batch = self._collect(step)
                batch.metrics["fleet_wait_s"] = waited
                self._ready.put(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which raises it
            self._ready.put(exc)

    def batch(self, step: int) -> RolloutBatch:
        """Step `step`'s batch, with the pipeline's metrics; the actor holds weights version step - 1."""
        start = time.perf_counter()
        if self._thread is None:
            batch = self._collect(step)
            batch.metrics["fleet_wait_s"] = 0.0
        else:
            batch = self._next_ready(step)
        waited = time.perf_counter() - start
        batch.metrics.update(
            trainer_wait_s=waited,
            overlap=max(0.0, 1.0 - waited / max(batch.generation_s, 1e-9)),
            **self._staleness(batch.rollouts, step),
        )
        return batch

    def _next_ready(self, step: int) -> RolloutBatch:
        while True:
            try:
                item = self._ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RolloutError(f"the rollout generator stopped before step {step}'s batch") from None
        if isinstance(item, UserError):  # a reward function's or a data row's: said as it is, one line
            raise item
        if isinstance(item, BaseException):
            raise RolloutError(
                f"generating the rollouts of step {step} (or a step before it) failed: {type(item).__name__}: {item}"
            ) from item
        if item.step != step:
            raise RolloutError(f"the trainer is at step {step} but the next batch generated is step {item.step}'s")
        return item

    def _staleness(self, rollouts: list, step: int) -> dict:
        """Versions behind the actor (weights step - 1); rollouts beyond the bound leave the loss."""
        dropped = 0
        for r in rollouts:
            if r.in_loss and step - 1 - r.weight_version > self.max_staleness:
                r.in_loss, dropped = False, dropped + 1
        if dropped:
            log.warning(
                "step %d: %d rollout(s) sampled more than rollout.max_staleness=%d weight versions ago were "
                "left out of the loss",
                step,
                dropped,
                self.max_staleness,
            )
        ages = [step - 1 - r.weight_version for r in rollouts if r.in_loss] or [0]
        return {"staleness_mean": sum(ages) / len(ages), "staleness_max": max(ages), "stale_dropped": dropped}

    def close(self) -> None:
        """Stop generating ahead; a request in flight is abandoned (the servers stop with the engine)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
