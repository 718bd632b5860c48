"""Ranks waiting for rank 0's long phases: no collective deadline, yet a frozen or failed rank 0 is
reported by name (real processes over gloo; see tests/support/rank0_phase.py)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from multiprocess import free_port

pytestmark = [pytest.mark.distributed]
SCRIPT = Path(__file__).resolve().parents[1] / "support" / "rank0_phase.py"
TIMEOUT_S = 2.0


def start(mode):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), mode, str(TIMEOUT_S)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def test_a_phase_four_times_longer_than_the_collective_deadline_completes():
    procs = start("slow")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for rank, out in enumerate(outs):
        assert f"rank {rank} result {{'rollouts': 42}}" in out, out


def test_a_frozen_rank0_is_reported_with_the_phase_it_hung_in():
    procs = start("hang")
    try:
        out = procs[1].communicate(timeout=120)[0]
        assert procs[1].returncode == 3, out
        assert (
            "rank 1 waited" in out
            and "for rank 0 in phase 'evaluation after step 7'" in out
            and "no heartbeat from rank 0" in out
        ), out
        seconds = float(out.split("error after ")[1].split("s:")[0])
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 10, out  # at the deadline, not at some later one
    finally:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)


def test_a_failing_rank0_phase_is_reported_to_the_waiting_rank():
    procs = start("fail")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[1].returncode == 3, outs
    assert (
        "Rank0Failed: rank 1: rank 0 failed in phase 'evaluation after step 7': DataError: data/x.parquet: row 3: "
        "no usable ground truth (user_error=True)" in outs[1]
    ), outs[1]
