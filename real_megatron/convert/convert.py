"""HF <-> Megatron checkpoint conversion (run inside a process group of tp * pp ranks).

hf_to_megatron: every rank builds its shard of the model, fills it from the HF safetensors
(tensor by tensor) and saves it with dist_checkpointing; any later TP/PP loads the result (it
reshards). The HF config, generation config and tokenizer files travel along in `<out>/hf/`.

megatron_to_hf: builds the model in the current layout, loads the model part of a converted or a
training checkpoint, and streams HF tensors (gathered over TP, each PP stage its own layers) into
sharded safetensors; padded vocabulary rows are stripped, the dtype is kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..actor.model import ArchSpec, build_model_chunks, transformer_config
from ..actor.model_state import load_model_weights, model_sharded_state_dict
from ..actor.weights import iter_hf_tensors, load_hf_weights
from ..ranks import barrier, global_rank, stage_first_rank
from .hf_io import HFCheckpointReader, HFCheckpointWriter, copy_side_files

INFO_FILE = "convert_info.json"
HF_DIR = "hf"


def _layout():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def _expert_layout(spec: ArchSpec) -> dict:
    """ep and etp of the running process groups, for transformer_config (dense models: none)."""
    if spec.moe is None:
        return {}
    from megatron.core import parallel_state as ps

    return dict(ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size())


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path) -> Path:
    from megatron.core import dist_checkpointing

    hf_dir, out = Path(hf_dir), Path(out_dir)
    spec = ArchSpec.from_pretrained(hf_dir)
    reader = HFCheckpointReader(hf_dir, spec)
    dtype = reader.get("model.embed_tokens.weight").dtype
    tp, pp = _layout()
    chunks = build_model_chunks(spec, transformer_config(spec, tp=tp, pp=pp, dtype=dtype, **_expert_layout(spec)))
    load_hf_weights(chunks, spec, reader.get)
    tmp = out.with_name(out.name + ".tmp")
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    barrier()
    if global_rank() == 0:
        (tmp / HF_DIR).mkdir()
        copy_side_files(hf_dir, tmp / HF_DIR)
        info = {
            "source": str(hf_dir),
            "family": spec.family,
            "tp": tp,
            "pp": pp,
            **_expert_layout(spec),
            "dtype": str(dtype).replace("torch.", ""),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier()
    return out


def megatron_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, hf_config_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    ckpt = Path(ckpt_dir)
    side = Path(hf_config_dir) if hf_config_dir else ckpt / HF_DIR
    if not (side / "config.json").exists():
        raise FileNotFoundError(
            f"no HF config for {ckpt}: expected {side / 'config.json'} (pass --hf-config DIR with the model's config.json)"
        )
    spec = ArchSpec.from_pretrained(side)
    dtype = _checkpoint_dtype(ckpt, side)
    tp, pp = _layout()
    chunks = build_model_chunks(spec, transformer_config(spec, tp=tp, pp=pp, dtype=dtype, **_expert_layout(spec)))
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        load_model_weights(chunks, ckpt)
    except (Exception, CheckpointException) as exc:
        failures = getattr(exc, "failures", None)  # torch's per-rank wrapper hides the reason inside
        reason = (
            "; ".join(str(f[0] if isinstance(f, tuple) else f) for f in failures.values()) if failures else str(exc)
        )
        raise RuntimeError(
            f"{ckpt}: could not load its model weights into a {spec.family} model built from "
            f"{side / 'config.json'} (a checkpoint of another model?): {reason}"
        ) from None
    out = write_hf_checkpoint(chunks, spec, Path(out_dir), side, dtype, max_shard_bytes)
    barrier()
    return out


def write_hf_checkpoint(
    chunks, spec: ArchSpec, out: Path, side_dir: Path | None, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Stream a live, sharded model into an HF checkpoint at `out` (global rank 0 writes).

    Every rank of a stage iterates (the TP gathers need all of them); with PP a stage's tensors
    then travel to rank 0 as one message. Used by the converter and by weight sync to servers.
    """
    writer = HFCheckpointWriter(out, max_shard_bytes) if global_rank() == 0 else None
    for name, tensor in iter_whole_model(chunks, spec):
        if writer is not None:
            writer.add(name, tensor.to(dtype))  # megatron may keep norms in float32
    if writer is not None:
        writer.close()
        if side_dir is not None:
            copy_side_files(side_dir, out)
    return out


def iter_whole_model(chunks, spec: ArchSpec):
    """Every HF tensor of the model, stage after stage, on every rank (a collective: drain it on
    all ranks). TP shards are gathered one tensor at a time; with PP a stage's tensors travel to
    the other ranks as one message."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        yield from iter_hf_tensors(chunks, spec)
        return
    stage = ps.get_pipeline_model_parallel_rank()
    for source_stage in range(pp):
        # on the host: a pickled CUDA tensor would unpickle onto the sender's device index
        holder = [[(n, t.cpu()) for n, t in iter_hf_tensors(chunks, spec)] if source_stage == stage else None]
        dist.broadcast_object_list(holder, src=stage_first_rank(source_stage, _layout()[1]))
        yield from holder[0]


def _checkpoint_dtype(ckpt: Path, side: Path) -> torch.dtype:
    info = ckpt / INFO_FILE
    if info.exists():
        return getattr(torch, json.loads(info.read_text())["dtype"])
    config = json.loads((side / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)
