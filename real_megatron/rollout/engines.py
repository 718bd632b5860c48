"""Building the run's rollout engine, with the way the actor's weights reach it.

`rollout.backend: local` is the embedded engine (weights handed over in memory); `sglang` the
fleet, launched by the trainer on this node's spare GPUs, attached by URL, or found in the job's
server registry (slurm/train.sbatch starts servers as their own job step). Weights go to the fleet
from disk (safetensors, servers reload) or by NCCL broadcast in buckets (rollout.weight_sync), or,
colocated on the trainer's GPUs (rollout.colocate), as tensors passed by handle: the
path is chosen here, once, and the engine carries it (weight_sync.py), so the loop only ever calls
`engine.load_weights(actor, version)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import Config
from ..rank0_phases import on_rank0
from ..ranks import is_rank0
from .broadcast_sync import BroadcastWeightSync
from .engine_setup import launched_server_gpus, requests_per_server, server_args
from .fleet_auth import fleet_key
from .local import InMemoryWeights, LocalEngine
from .registry import wait_for_servers
from .routing import sglang_routing
from .sglang_env import default_server_python
from .sglang_fleet import SGLangFleet
from .weight_sync import BroadcastWeights, DiskWeights, PeerEngine, TensorWeights

log = logging.getLogger(__name__)


def build_engine(cfg: Config, inputs, run_dir: Path):
    """The run's engine, on every trainer rank (a collective): rank 0 the embedded engine or the
    SGLang fleet, the other ranks a PeerEngine; each with the weight path the config asks for."""
    p = cfg.parallel
    weights = weight_path(cfg, run_dir, inputs.model_dir)
    engine = on_rank0(
        "starting the rollout engine",
        lambda: make_engine(cfg, inputs, run_dir, weights),
        timeout_s=p.timeout_s,
        share=False,
    )
    return engine if is_rank0() else PeerEngine(weights)


def weight_path(cfg: Config, run_dir: Path, model_dir: Path):
    """How the actor's weights reach this run's engine: in memory (embedded engine), safetensors on
    disk, or a broadcast (rollout.weight_sync); the same kind on every rank."""
    r = cfg.rollout
    if r.backend == "local":
        return InMemoryWeights()
    if r.colocate:  # the servers on the trainer's GPUs: tensors by handle, the actor offloaded between
        return TensorWeights(r.weight_sync_bucket_mb * 2**20, cfg.parallel.timeout_s)
    if r.weight_sync == "distributed":
        return BroadcastWeights()  # rank 0's joins the fleet's group in make_engine
    return DiskWeights(run_dir / "weights", model_dir, cfg.parallel.timeout_s)


def make_engine(cfg: Config, inputs, run_dir: Path, weights=None):
    """The rollout engine on rank 0: the embedded one, or the SGLang fleet (launched, attached to
    rollout.server_urls, or to the servers registering in rollout.server_registry); `weights`: its
    weight path (weight_path(); default: the config's)."""
    weights = weights if weights is not None else weight_path(cfg, run_dir, inputs.model_dir)
    if cfg.rollout.backend == "local":
        import transformers

        config = transformers.AutoConfig.from_pretrained(inputs.model_dir)
        engine = LocalEngine(config, pad_token_id=inputs.tokenizer.pad_token_id or 0, seed=cfg.train.seed)
        engine.weights = weights
        return engine
    r = cfg.rollout
    key, key_file = fleet_key(cfg)
    urls = r.server_urls or None
    if r.server_registry:  # servers of another job step (slurm/train.sbatch) announce themselves here
        urls = wait_for_servers(r.server_registry, r.num_servers, r.health_timeout_s, key=key)
    fleet = SGLangFleet(
        model_path=str(inputs.model_dir),
        urls=urls,
        num_servers=r.num_servers,
        server_tp=r.server_tp,
        host=r.server_host,
        base_port=r.server_base_port,
        server_python=r.server_python or default_server_python(),
        server_args=server_args(cfg),
        log_dir=run_dir / "logs",
        health_timeout_s=r.health_timeout_s,
        request_timeout_s=r.request_timeout_s,
        max_requests_per_server=requests_per_server(cfg),
        gpus=None if urls else launched_server_gpus(cfg),
        api_key=key,
        key_source=str(key_file),
        routing=sglang_routing(inputs.model_dir),
    )
    if isinstance(weights, BroadcastWeights):
        weights.sync = make_broadcaster(cfg, fleet)
    fleet.weights = weights
    return fleet


def make_broadcaster(cfg: Config, fleet: SGLangFleet) -> BroadcastWeightSync:
    """rollout.weight_sync: distributed -> rank 0's side of the broadcast group to the fleet."""
    r = cfg.rollout
    address = r.weight_sync_address or os.environ.get("MASTER_ADDR", "127.0.0.1")
    log.info("weight-update group on %s (NCCL_CUMEM_ENABLE=%s)", address, os.environ.get("NCCL_CUMEM_ENABLE"))
    return BroadcastWeightSync(
        fleet, address=address, bucket_bytes=r.weight_sync_bucket_mb * 2**20, timeout_s=cfg.parallel.timeout_s
    )
