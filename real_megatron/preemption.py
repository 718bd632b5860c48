"""Stopping at a step boundary when the cluster asks: checkpoint, then exit for a requeue.

Slurm warns a job before its time limit with the signal named in `--signal=B:USR1@<s>` (the batch
script forwards it to the trainer's ranks) and sends SIGTERM on preemption or scancel. The handler
only sets a flag; after each step every rank learns whether any rank saw a signal (a MAX
all-reduce of one integer), so all ranks stop at the same step, write one checkpoint together and
exit with REQUEUE_EXIT_CODE, which slurm/train.sbatch turns into `scontrol requeue`.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class PreemptionGuard:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("got %s: will checkpoint and stop after the current step", signal.Signals(signum).name)
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal (a collective: call it on all ranks)."""
        flag = 1 if self.received is not None else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            tensor = torch.tensor([flag], dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = int(tensor.item())
        return bool(flag)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
