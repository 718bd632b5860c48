"""Two ranks meet in a phase that only rank 0 runs: python rank0_phase.py MODE TIMEOUT_S
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment, as torchrun or Slurm set them).

slow: rank 0's phase lasts 4 x TIMEOUT_S; both ranks must finish with its result.
hang: rank 0 freezes (SIGSTOP) inside the phase; rank 1 must fail, naming the phase and rank 0.
fail: rank 0's phase raises a user's mistake (a DataError); rank 1 must fail with rank 0's reason,
knowing it is one rank 0 reports (Rank0Failed.user_error: the CLI then prints nothing more on rank 1).
"""

import datetime
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from real_megatron.data.dataset import DataError  # noqa: E402
from real_megatron.rank0_phases import on_rank0, start_heartbeat, stop_heartbeat  # noqa: E402


def main():
    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    start_heartbeat(timeout_s)

    def phase():
        if mode == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        if mode == "fail":
            raise DataError("data/x.parquet: row 3: no usable ground truth")
        time.sleep(4 * timeout_s)
        return {"rollouts": 42}

    begun = time.monotonic()
    try:
        result = on_rank0("evaluation after step 7", phase, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - printed for the test to read
        print(
            f"rank {dist.get_rank()} error after {time.monotonic() - begun:.1f}s: {type(exc).__name__}: {exc} "
            f"(user_error={getattr(exc, 'user_error', None)})",
            flush=True,
        )
        os._exit(3)
    dist.barrier()  # a collective right after the long phase works
    print(f"rank {dist.get_rank()} result {result} after {time.monotonic() - begun:.1f}s", flush=True)
    stop_heartbeat()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
