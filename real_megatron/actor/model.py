"""A megatron-core GPTModel from a Hugging Face `config.json` (Qwen2/2.5, Llama 3.x, Qwen3 dense,
Qwen3-MoE and Qwen2-MoE: their expert layers are megatron-core's MoELayer, see moe.py).

`ArchSpec` reads the architecture facts once (with clear errors for what is not supported);
`transformer_config` and `build_model_chunks` turn them into megatron-core objects. The
Transformer Engine layer spec is used when TE imports and CUDA is present, the pure-torch local
spec otherwise (CPU, tests). RoPE frequencies are set from the HF formulas, so Llama 3 scaling
with any (factor, low/high frequency factors, original length) matches transformers exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .moe import MOE_FAMILIES, MoESpec, mark_expert_params, moe_config_kwargs

SUPPORTED_FAMILIES = ("qwen2", "llama", "qwen3") + MOE_FAMILIES  # HF model_type


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    moe: Optional[MoESpec] = None  # experts, router, which layers are sparse; None: a dense model

    @classmethod
    def from_hf(cls, config: dict | Any, source: str = "<config>") -> ArchSpec:
        cfg = config if isinstance(config, dict) else config.to_dict()
        family = cfg.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            arch = cfg.get("architectures") or family
            raise UnsupportedModelError(
                f"{source}: unsupported architecture {arch!r} (model_type={family!r}); supported model types: "
                f"{', '.join(SUPPORTED_FAMILIES)} (Qwen2/Qwen2.5 incl. DeepSeek-R1-Distill-Qwen, Llama 3.x, Qwen3 dense, "
                "Qwen3-MoE, Qwen2-MoE)"
            )
        if family not in MOE_FAMILIES and (cfg.get("num_experts") or cfg.get("num_local_experts")):
            key = "num_experts" if cfg.get("num_experts") else "num_local_experts"
            raise UnsupportedModelError(
                f"{source}: {key}={cfg[key]} in a {family!r} config: experts are mapped "
                f"for model types {', '.join(MOE_FAMILIES)} only"
            )

        def need(key):
            if key not in cfg or cfg[key] is None:
                raise UnsupportedModelError(f"{source}: config has no {key!r}")
            return cfg[key]

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise UnsupportedModelError(f"{source}: rope scaling {kind!r} is not supported (supported: llama3)")
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=dict(scaling) if scaling else None,
            qkv_bias=_qkv_bias(family, cfg),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            moe=MoESpec.from_hf(cfg, family, need("num_hidden_layers"), source) if family in MOE_FAMILIES else None,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ArchSpec:
        config_file = Path(path) / "config.json"
        try:
            return cls.from_hf(json.loads(config_file.read_text()), str(config_file))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no config.json in {path} (expected a Hugging Face checkpoint directory)"
            ) from None

    def padded_vocab(self, tp: int) -> int:
        """Megatron splits the vocabulary evenly over TP ranks: pad to a multiple of tp."""
        return math.ceil(self.vocab_size / tp) * tp

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None, ep: int = 1, etp: int | None = None) -> None:
        from ..memory import Architecture, split_problems

        moe = self.moe
        arch = Architecture(
            hidden=self.hidden_size,
            layers=self.num_layers,
            heads=self.num_heads,
            kv_heads=self.num_kv_heads,
            ffn=self.intermediate_size,
            vocab=self.vocab_size,
            tied=self.tie_word_embeddings,
            head_dim=self.head_dim,
            experts=moe.num_experts if moe else 0,
            top_k=moe.top_k if moe else 0,
            moe_ffn=moe.moe_intermediate_size if moe else 0,
            shared_ffn=(moe.shared_expert_intermediate_size or 0) if moe else 0,
            moe_layers=len(moe.moe_layers) if moe else 0,
        )
        problems = split_problems(arch, tp, pp, vpp, ep, etp)
        if problems:
            raise ValueError(f"{self.family} model cannot be split this way: " + "; ".join(problems))


def _qkv_bias(family: str, cfg: dict) -> bool:
    if family == "qwen2":
        return True
    if family == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))  # transformers' Qwen2MoeConfig: qkv_bias, default true
    return bool(cfg.get("attention_bias", False))


def rope_inv_freq(spec: ArchSpec) -> torch.Tensor:
    """inv_freq exactly as transformers computes it (default and llama3 rope types)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = spec.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def use_transformer_engine(dtype: torch.dtype | None = None) -> bool:
    """Transformer Engine's layer spec: with CUDA and TE, for bf16/fp16 models. float32 takes the
    local spec: TE has no float32 backend for packed (THD) attention (flash and fused attention
    are 16-bit only, and its unfused path refuses THD), so an fp32 run with TE would fail at its
    first forward."""
    if not torch.cuda.is_available() or dtype == torch.float32:
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def fusions(on_gpu: bool) -> dict[str, bool]:
    """megatron-core's fused kernels that are valid for these models on this machine.

    On GPU: SwiGLU and bias-dropout-add through megatron's compiled fusions (torch.compile; these
    models have no linear biases, which the fused SwiGLU accepts); RoPE through Transformer
    Engine's kernel when TE is there; the weight-gradient GEMM accumulating straight into the fp32
    main_grad when Apex's fused_weight_gradient_mlp_cuda is built (GPTModel's output layer is a
    megatron linear that needs it even under the TE spec). On CPU none of them exists.
    Masked-softmax and persistent layer-norm fusions are Apex kernels of the local spec's
    attention and norms; the TE spec has its own fused attention and norms.
    """
    if not on_gpu:
        return dict(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
        )
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers

    return dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=rope_utils.fused_apply_rotary_pos_emb is not None,
        gradient_accumulation_fusion=bool(layers._grad_accum_fusion_available),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def transformer_config(
    spec: ArchSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    on_gpu: bool | None = None,
    recompute_layers: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    moe_dispatcher: str = "alltoall",
    moe_aux_loss_coef: float | None = None,
):
    """on_gpu: None = whether CUDA is available (it decides the fusions and where init happens).
    recompute_layers: with recompute, the first N layers of each stage (block method); None or all
    of them = every layer (uniform, one at a time); 0 = none. ep, etp (None: tp), moe_dispatcher,
    moe_aux_loss_coef (None: the HF config's router_aux_loss_coef): mixture-of-experts models only."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec.check_parallel(tp, pp, vpp, ep, etp)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    moe = (
        {}
        if spec.moe is None
        else moe_config_kwargs(
            spec.moe,
            ep=ep,
            etp=etp,
            dispatcher=moe_dispatcher,
            aux_loss_coef=moe_aux_loss_coef,
            grouped_gemm=use_transformer_engine(dtype) and on_gpu,
        )
    )
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.initializer_range,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        **fusions(on_gpu),
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        # Interleaved with 2 stages: each rank sends activations and gradients to the same peer at
        # once; batched isend/irecv matches them in posting order and can swap the two (seen on
        # gloo: wrong results with more micro-batches than stages). megatron's unbatched p2p puts
        # the two directions on different groups for 2-rank pipelines.
        batch_p2p_comm=not (pp == 2 and vpp is not None and vpp > 1),
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        **_recompute(recompute, recompute_layers, spec.num_layers // (pp * (vpp or 1))),
        **moe,
    )


def _recompute(on: bool, layers: int | None, per_chunk: int) -> dict:
    """megatron's recompute settings: every layer one at a time (uniform), or the first N (block)."""
    if not on or layers == 0:
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    if layers is None or layers >= per_chunk:
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=layers)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, as megatron-core's local spec builds it, that also works under sequence
    parallelism: each TP rank then normalises its slice of the sequence, so the weight's gradient is
    a partial sum; marked `sequence_parallel`, megatron's finalize_model_grads sums it over TP (what
    Transformer Engine's and Apex's norms do; megatron's torch wrapper refuses sequence parallelism)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


def layer_spec(spec: ArchSpec, dtype: torch.dtype | None = None, num_experts: int | None = None):
    """Transformer Engine's spec (THD packed sequences through its fused attention), else the local
    one with core attention that also takes packed sequences (packed_attention.py) and RMSNorm that
    also takes sequence parallelism. num_experts: an MoE layer (megatron's MoELayer: TE's grouped
    GEMM experts on GPU, SequentialMLP experts in the local spec)."""
    if use_transformer_engine(dtype):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return _with_router(
            get_gpt_layer_with_transformer_engine_spec(
                num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=spec.qk_norm
            )
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .packed_attention import PackedDotProductAttention

    local = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    layer, attention = local.submodules, local.submodules.self_attention.submodules
    attention.core_attention = PackedDotProductAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if spec.qk_norm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    return _with_router(local)


def _with_router(layer):
    """An MoE layer's router: megatron's TopKRouter with the aux loss over the whole micro-batch
    (moe_router.py); dense layers pass through."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    mlp = layer.submodules.mlp  # a ModuleSpec (0.16), or functools.partial(MoELayer, submodules=...) (0.19)
    submodules = getattr(mlp, "submodules", None) or getattr(mlp, "keywords", {}).get("submodules")
    if isinstance(submodules, MoESubmodules):
        from .moe_router import MicroBatchAuxLossRouter

        submodules.router = MicroBatchAuxLossRouter
    return layer


def block_spec(spec: ArchSpec, config, vp_stage: int | None):
    """This stage's transformer block: its layers and, for the local spec, the final norm. In an MoE
    model each layer is dense or sparse as the HF config says (MoESpec.layer_pattern)."""
    te = use_transformer_engine(config.params_dtype)
    dense = layer_spec(spec, config.params_dtype)
    if te and spec.moe is None:
        return dense
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    layers = [dense] * count
    if spec.moe is not None:
        sparse = layer_spec(spec, config.params_dtype, num_experts=spec.moe.num_experts)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        layers = [sparse if spec.moe.layer_pattern[offset + i] else dense for i in range(count)]
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def fuse_te_weight_gradients(model: torch.nn.Module) -> int:
    """Turn on Transformer Engine's own fused weight-gradient accumulation (wgrad GEMMs write
    straight into the fp32 main_grad) on every TE linear of `model`; returns how many.

    megatron-core ties it to config.gradient_accumulation_fusion, which it only allows with Apex's
    fused_weight_gradient_mlp_cuda (megatron's own linears, e.g. GPTModel's output layer, need it),
    so without Apex TE would lose its fusion for no reason of its own. TE's linears read
    `fuse_wgrad_accumulation` at every forward; megatron's own linears (`gradient_accumulation_fusion`)
    are left as they are."""
    count = 0
    for module in model.modules():
        if getattr(module, "fuse_wgrad_accumulation", None) is False:
            module.fuse_wgrad_accumulation = True
            count += 1
    return count


def build_model_chunks(spec: ArchSpec, config) -> list[torch.nn.Module]:
    """This rank's model chunks (one, or vpp of them for the interleaved pipeline schedule)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        kwargs = {"vp_stage": vp_stage} if vpp > 1 else {}
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(spec, config, vp_stage),
            vocab_size=spec.padded_vocab(config.tensor_model_parallel_size),
            max_sequence_length=spec.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta),
            **kwargs,
        )
        if spec.moe is not None:
            mark_expert_params(model)  # one optimizer structure at every EP size (checkpoints reshard)
        if use_transformer_engine(config.params_dtype) and not config.gradient_accumulation_fusion:
            fuse_te_weight_gradients(model)  # no Apex: TE's own fusion still applies
        if getattr(model, "rotary_pos_emb", None) is not None:
            model.rotary_pos_emb.inv_freq = rope_inv_freq(spec).to(model.rotary_pos_emb.inv_freq.device)
        chunks.append(model)
    return chunks
