"""The experts an engine routed each token to, for routing replay (`actor.routing_replay: rollout`).

A mixture-of-experts engine picks top-k experts per token and MoE layer; the trainer's recomputation
of the same tokens can pick others (other kernels, other batch shapes, a near tie), and then
pi_old is not the policy that sampled. Both engines report their choice, and the actor replays it
(actor/routing_replay.py).

The convention is SGLang's (`return_routed_experts`): one int tensor per rollout of shape
[prompt + response - 1, MoE layers, top_k], one row per token the engine fed through the model:
the prompt (prefill) and every response token but the last (sampled, never fed back). Layers are
the MoE layers in order (dense layers of `mlp_only_layers` / `decoder_sparse_step` have none).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .sglang_env import SGLANG_VERSION


@dataclass(frozen=True)
class RoutingShape:
    """What an engine's routing report of one model looks like."""

    num_layers: int  # every decoder layer (SGLang reports one row per layer, dense ones included)
    moe_layers: tuple[int, ...]  # the MoE layers, from 0
    top_k: int
    num_experts: int

    @property
    def dtype(self) -> torch.dtype:
        """Compact storage: a step of Qwen3-30B-A3B rollouts (48 layers x 8 experts a token) holds
        384 ids per token; one byte each while the experts number at most 256."""
        return torch.uint8 if self.num_experts <= 256 else torch.int16

    @classmethod
    def of_hf_config(cls, config, source: str = "<config>") -> Optional[RoutingShape]:
        """The routing shape of an HF config (a dict or a transformers config); None for a dense model."""
        from ..actor.moe import MOE_FAMILIES, MoESpec

        cfg = config if isinstance(config, dict) else config.to_dict()
        family = cfg.get("model_type")
        if family not in MOE_FAMILIES:
            return None
        layers = cfg["num_hidden_layers"]
        moe = MoESpec.from_hf(cfg, family, layers, source)
        return cls(num_layers=layers, moe_layers=tuple(moe.moe_layers), top_k=moe.top_k, num_experts=moe.num_experts)


def expected_rows(prompt_tokens: int, response_tokens: int) -> int:
    """Tokens an engine routed for one rollout: the prompt and all response tokens but the last."""
    return prompt_tokens + response_tokens - 1


# --- the embedded engine: transformers' routers, hooked -------------------------------------------

_ROUTER_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.mlp\.gate")


class RouterCapture:
    """Records, during transformers' `generate`, the top-k experts every MoE router picked on every
    forward call (a context manager: forward hooks on the routers while it is open).

    transformers' Qwen3-MoE and Qwen2-MoE routers return (logits, weights, expert ids): the ids are
    taken as they are (what the experts were run with); a router returning logits only is read
    through its top-k."""

    def __init__(self, model: torch.nn.Module, shape: RoutingShape):
        self.shape = shape
        self.routers = {}
        for name, module in model.named_modules():
            match = _ROUTER_NAME.fullmatch(name)
            if match and int(match[1]) in shape.moe_layers:
                self.routers[int(match[1])] = module
        missing = sorted(set(shape.moe_layers) - set(self.routers))
        if missing:
            raise ValueError(
                f"routing capture: no router module 'model.layers.<i>.mlp.gate' for MoE layers {missing} "
                f"of {type(model).__name__}"
            )
        self.calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in shape.moe_layers}
        self._handles = []

    def __enter__(self) -> RouterCapture:
        for layer, module in self.routers.items():
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: int):
        def record(module, inputs, output):
            if isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point():
                ids = output[2]
            else:
                logits = output[0] if isinstance(output, tuple) else output
                ids = torch.topk(logits.float(), self.shape.top_k, dim=-1).indices
            self.calls[layer].append(ids.reshape(-1, self.shape.top_k).detach().to("cpu", torch.int64))

        return record

    def per_sequence(
        self, batch: int, width: int, prompt_lengths: list[int], response_lengths: list[int]
    ) -> list[torch.Tensor]:
        """One [prompt + response - 1, MoE layers, top_k] tensor per sequence of a left-padded
        `generate` call: the first call was the prefill over [batch, width], each later one fed one
        token per sequence."""
        steps = len(self.calls[self.shape.moe_layers[0]])
        if steps == 0 or any(len(c) != steps for c in self.calls.values()):
            raise RuntimeError(
                f"routing capture: the routers saw {[len(c) for c in self.calls.values()]} forward calls "
                "(expected the same number per MoE layer, at least one)"
            )
        prefill = torch.stack([self.calls[layer][0] for layer in self.shape.moe_layers], dim=1)
        if prefill.shape[0] != batch * width:
            raise RuntimeError(
                f"routing capture: the first call routed {prefill.shape[0]} tokens, expected the prefill "
                f"of {batch} x {width}"
            )
        prefill = prefill.view(batch, width, len(self.shape.moe_layers), self.shape.top_k)
        if steps > 1:
            decode = torch.stack(
                [
                    torch.stack([self.calls[layer][j] for layer in self.shape.moe_layers], dim=1)
                    for j in range(1, steps)
                ],
                dim=1,
            )  # [batch, steps - 1, layers, k]
        out = []
        for i, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths)):
            if response - 1 > steps - 1:
                raise RuntimeError(
                    f"routing capture: sequence {i} has {response} response tokens but the routers saw "
                    f"{steps - 1} decoding calls"
                )
            parts = [prefill[i, width - prompt :]] + ([decode[i, : response - 1]] if response > 1 else [])
            out.append(torch.cat(parts).to(self.shape.dtype))
        return out


# --- the SGLang fleet: meta_info.routed_experts --------------------------------------------------


def from_sglang(
    encoded, shape: RoutingShape, prompt_tokens: int, response_tokens: int, where: str = "SGLang"
) -> torch.Tensor:
    """SGLang's `meta_info.routed_experts` (base64 of int32 [tokens - 1, every layer, top_k], or a
    nested list) as [prompt + response - 1, MoE layers, top_k]."""
    if isinstance(encoded, str):
        flat = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.int32)
    else:
        flat = torch.tensor(encoded, dtype=torch.int32).reshape(-1)
    row = shape.num_layers * shape.top_k
    rows = expected_rows(prompt_tokens, response_tokens)
    if flat.numel() != rows * row:
        raise ValueError(
            f"{where}: routed_experts holds {flat.numel()} ids, expected {rows} tokens x "
            f"{shape.num_layers} layers x top_k {shape.top_k} = {rows * row}"
        )
    table = flat.view(rows, shape.num_layers, shape.top_k)[:, list(shape.moe_layers)]
    if rows and (int(table.min()) < 0 or int(table.max()) >= shape.num_experts):
        raise ValueError(f"{where}: routed_experts names experts outside [0, {shape.num_experts})")
    return table.to(shape.dtype)


SGLANG_SERVER_FLAG = "--enable-return-routed-experts"  # SGLang's server option (0.5.x)


def sglang_routing(model_dir) -> RoutingShape | None:
    """A mixture-of-experts checkpoint's routing shape, which its SGLang servers report (None: a
    dense model). Refused: dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step):
    SGLang 0.5.23 builds every Qwen3-MoE and Qwen2-MoE layer as an MoE layer, so it would serve
    other weights than the trainer's without an error."""
    config_file = Path(model_dir) / "config.json"
    shape = RoutingShape.of_hf_config(json.loads(config_file.read_text()), str(config_file))
    if shape is not None and len(shape.moe_layers) != shape.num_layers:
        dense = sorted(set(range(shape.num_layers)) - set(shape.moe_layers))
        raise ValueError(
            f"{config_file}: layers {dense} are dense MLPs (mlp_only_layers / decoder_sparse_step); SGLang "
            f"{SGLANG_VERSION} builds every layer of this family as an MoE layer and would serve other "
            "weights than the trainer's: use rollout.backend=local, or a model whose layers are all MoE"
        )
    return shape
