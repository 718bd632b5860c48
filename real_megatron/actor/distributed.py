"""Process-group setup from torchrun or Slurm, then megatron-core's model-parallel groups.

Rank, world size and the master address come from torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) or, under srun, from Slurm's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; master = $MASTER_ADDR, else the first host of the step's nodes). nccl on GPU, gloo on CPU. Every
collective inherits the group timeout, so a missing peer is an error, not a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # "node[01-04,07]" -> "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # the step's nodes: in a job that also runs servers, the job's first node may not be a trainer's
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        master = env.get("MASTER_ADDR") or _first_slurm_host(nodes)
        # a port derived from the job id: concurrent jobs on one node do not collide
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return LaunchEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), master, port, "slurm"
        )
    # alone: any free port (a fixed one collides with another run on the same machine)
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device this process uses, among the ones it can see.

    Under `srun --gpus-per-task=1` (or any per-task binding) each task sees exactly one GPU, as
    device 0, whatever its local rank; with the node's GPUs all visible, local rank i takes GPU i.
    """
    if visible_devices < 1:
        raise RuntimeError("CUDA is available but this process sees no GPU (check CUDA_VISIBLE_DEVICES)")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this process sees {visible_devices} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one "
            "trainer process per visible GPU, or bind one GPU per task (srun --gpus-per-task=1)"
        )
    return local_rank


def gpu_environment_warnings(cuda: bool, environ: dict | None = None) -> list[str]:
    """Settings meant for CPU runs that would silently slow down (or break) a GPU run."""
    from ..kernels.dispatch import INTERPRETER_ON_GPU, interpreting

    env = os.environ if environ is None else environ
    found = []
    if cuda and interpreting(env):
        found.append(INTERPRETER_ON_GPU)
    if cuda and env.get("CUDA_VISIBLE_DEVICES", None) == "":
        found.append("CUDA_VISIBLE_DEVICES is empty: this process can use no GPU")
    return found


def trainer_environment(cfg, cuda: bool) -> dict[str, str]:
    """Environment a GPU trainer process needs before CUDA starts (applied with setdefault).

    CUDA_DEVICE_MAX_CONNECTIONS=1 keeps megatron's tensor-parallel communication ordered ahead of
    the compute it overlaps (sequence parallelism requires it); expandable segments let the
    allocator reuse memory across the very different shapes of rollout batches.
    """
    if not cuda:
        return {}
    out = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if cfg.parallel.sequence_parallel or cfg.parallel.tp > 1:
        out["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` now (for a rendezvous this process then listens on)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    timeout_s: float = 600.0,
    expected_world_size: int | None = None,
    seed: int = 1234,
    ep: int = 1,
    etp: int | None = None,
) -> LaunchEnv:
    """Join (or create) the default process group and megatron-core's TP/PP/DP/CP groups, and for
    mixture-of-experts models its expert groups (EP, expert TP = etp or tp, expert DP)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from .cpu_compat import enable as enable_cpu_compat

    enable_cpu_compat()
    env = launch_env()
    if expected_world_size is not None and env.world_size != expected_world_size:
        raise RuntimeError(
            f"the launcher started {env.world_size} processes ({env.source}) but the config asks for "
            f"parallel.nodes x parallel.gpus_per_node = {expected_world_size}"
        )
    for warning in gpu_environment_warnings(torch.cuda.is_available()):
        log.warning(warning)
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_device_index(env.local_rank, torch.cuda.device_count()))
    if not dist.is_initialized():
        # env:// lets torchrun's workers share its agent's store; Slurm's values are exported first
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    from ..rank0_phases import start_heartbeat

    start_heartbeat(timeout_s)  # rank 0's sign of life for ranks waiting on its long phases
    return env


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    from ..rank0_phases import stop_heartbeat

    stop_heartbeat()

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
