"""A CPU layer spec that names its parameters the way Transformer Engine's spec does.

TE fuses each pre-norm into the next linear (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`, no `input_layernorm` / `pre_mlp_layernorm` modules) and keeps FP8
metadata in `_extra_state` on its linears and on core attention. TE needs CUDA; this spec computes
exactly what the local spec computes (the same RMSNorm, then the same linear) under TE's names, so
checkpoints can be moved between the two namings on a CPU.
"""

import copy
import functools
import io

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from real_megatron.actor.packed_attention import PackedDotProductAttention


class NormedColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm fused in front of a column-parallel linear, as TELayerNormColumnParallelLinear."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.norm_eps = config.layernorm_epsilon

    def forward(self, input_, *args, **kwargs):
        normed = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.norm_eps)
        return super().forward(normed, *args, **kwargs)

    def get_extra_state(self):
        return io.BytesIO(b"fp8-meta")  # what TE keeps here (FP8 scales and history)

    def set_extra_state(self, state):
        pass


class ExtraStateAttention(PackedDotProductAttention):
    """Core attention with an `_extra_state`, as TEDotProductAttention has."""

    def get_extra_state(self):
        return io.BytesIO(b"fp8-meta")

    def set_extra_state(self, state):
        pass


def te_named_layer_spec(local_spec):
    spec = copy.deepcopy(local_spec)
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.sharded_state_dict_keys_map = {}
    layer.self_attention.submodules.linear_qkv = NormedColumnParallelLinear
    layer.self_attention.submodules.core_attention = ExtraStateAttention
    mlp_submodules(layer.mlp).linear_fc1 = NormedColumnParallelLinear
    return spec


def mlp_submodules(mlp):
    """The MLP's submodules: a ModuleSpec's (megatron-core 0.16) or, from 0.19, those bound into the
    `functools.partial(MLP.as_mlp_submodule, submodules=...)` the layer specs build."""
    if isinstance(mlp, functools.partial):
        return mlp.keywords["submodules"]
    return mlp.submodules
