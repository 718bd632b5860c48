"""The rollout engine a run generates with, and how the actor's weights reach it.

`rollout.backend: local` is the embedded engine (weights handed over in memory); `sglang` the
fleet, launched by the trainer on this node's spare GPUs, attached by URL, or found in the job's
server registry (slurm/train.sbatch starts servers as their own job step). Weights go to the fleet
from disk (safetensors, servers reload) or by NCCL broadcast in buckets (rollout.weight_sync).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from ..config import Config
from ..rank0_phases import is_rank0

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
    from .fleet_auth import key_file_of

    r = cfg.rollout
    servers = len(r.server_urls) or r.num_servers
    bound = requests_per_server(cfg)
    why = (f"rollout.max_requests_per_server={r.max_requests_per_server}" if r.max_requests_per_server else
           f"ceil({cfg.train.prompts_per_step} prompts x {r.n_samples} samples / {servers} server(s))")
    return (f"{servers} SGLang server(s), up to {bound} requests in flight each ({why}); "
            f"key {key_file_of(cfg)}, weights by {r.weight_sync}")


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
            log.warning("%s=%s replaced by %s: the SGLang servers of the weight-update group use %s",
                        key, environ[key], value, value)
        environ[key] = value


def make_engine(cfg: Config, inputs, run_dir: Path):
    """The rollout engine on rank 0: the embedded one, or the SGLang fleet (launched, attached to
    rollout.server_urls, or to the servers registering in rollout.server_registry)."""
    from .local import LocalEngine

    if cfg.rollout.backend == "local":
        import transformers

        config = transformers.AutoConfig.from_pretrained(inputs.model_dir)
        return LocalEngine(config, pad_token_id=inputs.tokenizer.pad_token_id or 0, seed=cfg.train.seed)
    from .fleet_auth import fleet_key
    from .sglang_env import default_server_python
    from .sglang_fleet import SGLangFleet

    r = cfg.rollout
    key, key_file = fleet_key(cfg)
    urls = r.server_urls or None
    if r.server_registry:  # servers of another job step (slurm/train.sbatch) announce themselves here
        from .registry import wait_for_servers

        urls = wait_for_servers(r.server_registry, r.num_servers, r.health_timeout_s, key=key)
    return SGLangFleet(
        model_path=str(inputs.model_dir), urls=urls, num_servers=r.num_servers, server_tp=r.server_tp,
        host=r.server_host, base_port=r.server_base_port, server_python=r.server_python or default_server_python(),
        server_args=r.server_args, log_dir=run_dir / "logs", health_timeout_s=r.health_timeout_s,
        request_timeout_s=r.request_timeout_s, max_requests_per_server=requests_per_server(cfg),
        gpus=None if urls else launched_server_gpus(cfg), api_key=key, key_source=str(key_file),
        routing=sglang_routing(inputs.model_dir),
    )


def sglang_routing(model_dir):
    """A mixture-of-experts checkpoint's routing shape, which its SGLang servers report (None: a
    dense model). Refused: dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step):
    SGLang 0.5.23 builds every Qwen3-MoE and Qwen2-MoE layer as an MoE layer, so it would serve
    other weights than the trainer's without an error."""
    import json

    from .routing import RoutingShape
    from .sglang_env import SGLANG_VERSION

    config_file = Path(model_dir) / "config.json"
    shape = RoutingShape.of_hf_config(json.loads(config_file.read_text()), str(config_file))
    if shape is not None and len(shape.moe_layers) != shape.num_layers:
        dense = sorted(set(range(shape.num_layers)) - set(shape.moe_layers))
        raise ValueError(f"{config_file}: layers {dense} are dense MLPs (mlp_only_layers / decoder_sparse_step); SGLang "
                         f"{SGLANG_VERSION} builds every layer of this family as an MoE layer and would serve other "
                         "weights than the trainer's: use rollout.backend=local, or a model whose layers are all MoE")
    return shape


def launched_server_gpus(cfg: Config, environ: dict | None = None) -> list[str] | None:
    """GPUs for the servers this trainer launches: rollout.server_gpus, else this node's GPUs after
    the trainer ranks' (local rank i uses GPU i). None on a machine without GPUs."""
    from .sglang_fleet import visible_gpus

    visible = visible_gpus(environ)
    if not visible:
        return None
    if cfg.rollout.server_gpus:
        unknown = [g for g in cfg.rollout.server_gpus if g >= len(visible)]
        if unknown:
            raise ValueError(f"rollout.server_gpus names GPU(s) {unknown}; this process sees {len(visible)}")
        return [visible[g] for g in cfg.rollout.server_gpus]
    return visible[cfg.parallel.gpus_per_node:]


def make_broadcaster(cfg: Config, engine):
    """rollout.weight_sync: distributed -> the broadcast group to the fleet (on rank 0)."""
    from .broadcast_sync import BroadcastWeightSync

    r = cfg.rollout
    if r.backend != "sglang" or r.weight_sync != "distributed" or not is_rank0():
        return None
    address = r.weight_sync_address or os.environ.get("MASTER_ADDR", "127.0.0.1")
    log.info("weight-update group on %s (NCCL_CUMEM_ENABLE=%s)", address, os.environ.get("NCCL_CUMEM_ENABLE"))
    return BroadcastWeightSync(engine, address=address, bucket_bytes=r.weight_sync_bucket_mb * 2**20,
                               timeout_s=cfg.parallel.timeout_s)


def sync_weights(actor, engine, run_dir: Path, version: int, model_dir: Path, cfg: Config, broadcaster=None) -> float:
    """The actor's weights to the engine as `version` (a collective: every rank calls it); seconds taken."""
    from ..convert.convert import iter_whole_model
    from .weight_sync import sync_to_fleet_from_disk

    start = time.perf_counter()
    if cfg.rollout.backend == "local":  # the config decides: ranks > 0 hold no engine
        state = actor.gather_hf_state_dict()  # the full model on rank 0 (small models only)
        if is_rank0():
            engine.update_weights(state.items(), version)
    elif cfg.rollout.weight_sync == "distributed":
        tensors = iter_whole_model(actor.chunks, actor.spec)  # a collective: every rank drains it
        if broadcaster is not None:
            broadcaster.push(tensors, version, actor.settings.dtype)
        else:
            for _ in tensors:
                pass
    else:
        sync_to_fleet_from_disk(actor, engine, run_dir / "weights", version, model_dir, cfg.parallel.timeout_s)
    return time.perf_counter() - start


def close_engine(engine, broadcaster=None) -> None:
    if broadcaster is not None:
        broadcaster.close()
    if hasattr(engine, "stop"):
        engine.stop()  # only servers this process launched; attached ones keep running
