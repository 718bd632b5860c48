"""The rollout engine a run asks for, worked out from the config alone (no torch, so --dry-run and
the launcher read it cheaply): the fleet's request bound and key, the GPUs of the servers the
trainer launches, the environment the weight group needs. engines.py builds the engine."""

from __future__ import annotations

import logging
import math
import os

from ..config import Config
from .fleet_auth import key_file_of
from .sglang_fleet import visible_gpus

log = logging.getLogger(__name__)


def requests_per_server(cfg: Config) -> int:
    """rollout.max_requests_per_server, or (0) a step's samples spread over the servers: the whole
    batch in flight at once, however many servers there are."""
    r = cfg.rollout
    if r.max_requests_per_server > 0:
        return r.max_requests_per_server
    servers = len(r.server_urls) or r.num_servers
    return math.ceil(cfg.train.prompts_per_step * r.n_samples / max(1, servers))


def describe_fleet(cfg: Config) -> str:
    """The fleet's request bound and key, for --dry-run."""
    r = cfg.rollout
    servers = len(r.server_urls) or r.num_servers
    bound = requests_per_server(cfg)
    why = (
        f"rollout.max_requests_per_server={r.max_requests_per_server}"
        if r.max_requests_per_server
        else f"ceil({cfg.train.prompts_per_step} prompts x {r.n_samples} samples / {servers} server(s))"
    )
    return (
        f"{servers} SGLang server(s), up to {bound} requests in flight each ({why}); "
        f"key {key_file_of(cfg)}, weights by {'tensors (colocated)' if r.colocate else r.weight_sync}"
    )


def trainer_fleet_environment(cfg: Config) -> dict[str, str]:
    """What the trainer's environment must say before NCCL starts, for the fleet: SGLang's
    processes run with NCCL_CUMEM_ENABLE=0 (unless told otherwise), and an NCCL group whose ranks
    disagree on it fails or hangs, so the weight-update group's trainer side says the same."""
    r = cfg.rollout
    if r.backend == "sglang" and r.weight_sync == "distributed":
        return {"NCCL_CUMEM_ENABLE": "0"}
    return {}


def apply_trainer_fleet_environment(cfg: Config, environ=None) -> None:
    """trainer_fleet_environment into `environ` (os.environ), overriding: a different value there
    would break the group, so it is replaced, with a warning."""
    environ = os.environ if environ is None else environ
    for key, value in trainer_fleet_environment(cfg).items():
        if environ.get(key, value) != value:
            log.warning(
                "%s=%s replaced by %s: the SGLang servers of the weight-update group use %s",
                key,
                environ[key],
                value,
                value,
            )
        environ[key] = value


MEMORY_SAVER_FLAG = "--enable-memory-saver"


def server_args(cfg: Config, environ: dict | None = None) -> list[str]:
    """rollout.server_args, and for colocated servers on GPUs SGLang's memory saver (torch_memory_saver:
    what lets /release_memory_occupation hand the GPU memory back) and a static memory fraction that
    leaves the actor's resident share free (memory.colocated_mem_fraction). Without a GPU SGLang has no saver
    (torch_memory_saver is CUDA's); its release and resume calls then run and free nothing."""
    r = cfg.rollout
    args = list(r.server_args)
    if r.colocate and visible_gpus(environ):
        if MEMORY_SAVER_FLAG not in args:
            args.append(MEMORY_SAVER_FLAG)
        if "--mem-fraction-static" not in args:  # beside the actor's resident share (memory.py)
            from ..memory import colocated_mem_fraction

            args += ["--mem-fraction-static", str(colocated_mem_fraction(cfg.parallel.gpu_memory_gb))]
    return args


def launched_server_gpus(cfg: Config, environ: dict | None = None) -> list[str] | None:
    """GPUs for the servers this trainer launches: rollout.server_gpus, else this node's GPUs after
    the trainer ranks' (local rank i uses GPU i), or the trainer's own GPUs when colocated. None on
    a machine without GPUs."""
    visible = visible_gpus(environ)
    if not visible:
        return None
    if cfg.rollout.colocate:
        return visible[: cfg.parallel.gpus_per_node]
    if cfg.rollout.server_gpus:
        unknown = [g for g in cfg.rollout.server_gpus if g >= len(visible)]
        if unknown:
            raise ValueError(f"rollout.server_gpus names GPU(s) {unknown}; this process sees {len(visible)}")
        return [visible[g] for g in cfg.rollout.server_gpus]
    return visible[cfg.parallel.gpus_per_node :]
