"""Reading HF checkpoints tensor by tensor (safetensors, sharded or not), with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..actor.model import ArchSpec
from .mapping import expected_hf_names


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
