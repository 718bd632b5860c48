"""Reading HF checkpoints tensor by tensor (safetensors, sharded or not), with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..actor.model import ArchSpec
from ..hf_mapping import expected_hf_names


class HFCheckpointReader:
    """`get(name)` loads one tensor; the checkpoint is checked against the architecture up front."""

    def __init__(self, path: str | Path, spec: ArchSpec):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors files (only safetensors checkpoints are read)")
            weight_map = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    weight_map.update({k: file.name for k in f.keys()})
        self.weight_map = weight_map
        missing = [n for n in expected_hf_names(spec) if n not in weight_map]
        if spec.tie_word_embeddings:
            missing = [n for n in missing if n != "lm_head.weight"]
        if missing:
            raise KeyError(
                f"{self.path}: {len(missing)} tensor(s) the {spec.family} config.json implies are missing, e.g. "
                f"{', '.join(missing[:5])}: is this checkpoint for another model?"
            )
        self._handles = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"{self.path}: no tensor {name!r} in the checkpoint")
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file].get_tensor(name)


# Files a serving engine needs beside the weights; copied as they are.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_side_files(source: str | Path, target: str | Path) -> list[str]:
    import shutil

    copied = []
    for name in SIDE_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


class HFCheckpointWriter:
    """Writes tensors as they arrive into safetensors shards of at most `max_shard_bytes`, with
    model.safetensors.index.json when there is more than one shard. Memory: one shard."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.out / name, metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (part, tensors) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out / part).rename(self.out / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
