"""How much memory one trainer GPU needs, before renting the GPUs: `real-megatron train --dry-run`.

A first-order estimate for the heaviest pipeline stage, in the style of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"), for megatron-core with the
distributed optimizer:
  weights      params on this GPU x bytes of model.dtype
  gradients    fp32 main_grad buffer (Megatron DDP accumulates and reduces in fp32)
  optimizer    fp32 master copy (when the model is not fp32) + Adam m and v, sharded over DP;
               with optim.cpu_offload (megatron-core's HybridDeviceOptimizer) the offloaded share
               (optim.cpu_offload_fraction) moves to pinned host memory: there 16 B per parameter
               (an fp32 master copy, Adam m and v, the fp32 gradient copied out), while the GPU keeps
               of that share only the distributed optimizer's fp32 main shard (4 B; none with
               use_precision_aware_optimizer, which hands the offload the 16-bit shards, or for an
               fp32 model, whose main parameters are its weights)
  activations  the tensors one layer keeps for backward, per token: 7h + 2 kv_dim + 3 ffn elements
               with Transformer Engine (flash attention keeps q, k, v, its output and the softmax
               statistics); 12h + 5 ffn elements and the fp32 softmax statistics (heads) with the
               local spec, whose attention is torch's scaled_dot_product_attention (no [L, L]
               scores; measured on CPU: 3-4% within the count); divided by tp where TP splits them
               (all of them with sequence parallelism); with full recompute only each layer's input
               (h) plus one layer's set; 1F1B keeps up to pp micro-batches in flight. Measured
               against torch's allocator on CPU (tests/integration/test_memory_measured.py,
               docs/actor.md): activations and output layer at most 5% below the real peak and
               up to 1.5x above it without recompute; with recompute up to 1.7x above it (the
               recomputed layer's set and the output layer's tiles are added, though they never coexist)
  output layer the fused path (default): a tile of logits and its gradient, the picked hidden states and their
               fp32 gradient, the output weight's gradient; the naive path: [tokens, V/tp] logits
               and GPTModel's transposed copy (or one of them with the picked [response, V/tp] rows
               and their gradient)
  reference    algorithm.kl=reference: the frozen initial model, weights only (model.dtype), on the
               actor's layout; with actor.reference_offload it is on the GPU only during the log-prob
               pass, where the update's activations and output layer are not, so it adds only what it
               exceeds them by (and the same bytes of pinned host memory per GPU)
  context par. parallel.cp > 1: each rank holds 1/cp of every sequence, so activations and the
               attention scores shrink with it (for a given micro-batch); what CP adds is K/V of the
               whole row: the local spec gathers every layer's K/V over the CP group and keeps them for
               backward, and one attention mask (a rank's queries x their sequences' length, model
               dtype) per micro-batch; Transformer Engine's ring passes two K/V chunks per layer at a time
  reserve      CUDA context, NCCL buffers, allocator fragmentation
Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE): expert weights are split over parallel.ep x etp
(each rank holds E/ep experts, each cut etp ways), the rest over tp; the distributed optimizer
shards expert state over the expert-data-parallel ranks (world / (pp x ep x etp)) and the rest over
dp. An MoE layer keeps, per token, its top_k routed copies (the expert input, fc1's output and the
activation's, the expert output for the weighted sum) and the router's fp32 scores instead of a
dense MLP's; the dispatcher's send and receive buffers of one layer (alltoall: tokens x top_k x h
each way; allgather: the tokens of all ep ranks) exist once. Routing is taken as balanced: a
micro-batch whose tokens crowd onto few experts needs more on their ranks.
A micro-batch holds actor.max_tokens_per_micro_batch tokens per rank when set (packed rows; under
CP a rank's share after the split); else actor.prompts_per_micro_batch x n_samples / dp sequences of
data.max_prompt_tokens + rollout.max_new_tokens, 1/cp of each on a rank.
The architecture comes from model.path/config.json, or from model.hf_config_overrides when the
checkpoint is not on this machine (the shipped configs carry their model's public numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
RESERVE_GB = 4.0
LOGITS_TILE_ELEMENTS = 2**25  # linear_token_logprobs' largest tile
# optim.cpu_offload: host bytes per offloaded parameter (fp32 master copy, Adam m and v, fp32 gradient copy)
HOST_OPTIMIZER_BYTES = 16


@dataclass
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    head_dim: int
    qkv_bias: bool = True
    qk_norm: bool = False
    # mixture of experts (0 experts: a dense model)
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0  # one expert's intermediate size
    shared_ffn: int = 0  # Qwen2-MoE's gated shared expert (0: none)
    moe_layers: int = 0  # how many layers are MoE layers (the rest dense MLPs of `ffn`)

    @classmethod
    def from_hf(cls, c: dict) -> Architecture:
        heads = c["num_attention_heads"]
        family = c.get("model_type", "qwen2")
        moe = {}
        if family in ("qwen3_moe", "qwen2_moe"):
            # actor/moe.py's rule (MoESpec): layer i is sparse unless in mlp_only_layers, every decoder_sparse_step-th
            dense = set(c.get("mlp_only_layers") or [])
            step = c.get("decoder_sparse_step", 1) or 1
            moe = dict(
                experts=c.get("num_experts") or c["num_local_experts"],
                top_k=c["num_experts_per_tok"],
                moe_ffn=c["moe_intermediate_size"],
                shared_ffn=c.get("shared_expert_intermediate_size") or 0,
                moe_layers=sum(i not in dense and (i + 1) % step == 0 for i in range(c["num_hidden_layers"])),
            )
        return cls(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            ffn=c.get("intermediate_size", 0),
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            qkv_bias=bool(c.get("qkv_bias", True))
            if family == "qwen2_moe"
            else bool(c.get("attention_bias", family == "qwen2")),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            **moe,
        )

    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o
        return attention + (q + 2 * kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm + 2 * h  # + two norms

    def expert_params(self) -> int:
        """One expert of one MoE layer (gated MLP)."""
        return 3 * self.hidden * self.moe_ffn

    def moe_layer_dense_params(self) -> int:
        """An MoE layer's parameters outside its experts: attention, norms, router, shared expert and its gate."""
        shared = 3 * self.hidden * self.shared_ffn + self.hidden if self.shared_ffn else 0
        return self.attention_params() + self.experts * self.hidden + shared

    def layer_params(self) -> int:
        """A dense layer: attention, norms, gated MLP."""
        return self.attention_params() + 3 * self.hidden * self.ffn

    def _embeddings(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden  # + the final norm

    def total_params(self) -> int:
        dense_layers = self.layers - self.moe_layers
        moe = self.moe_layers * (self.moe_layer_dense_params() + self.experts * self.expert_params())
        return self._embeddings() + dense_layers * self.layer_params() + moe

    def active_params(self) -> int:
        """Parameters one token passes through: every expert but its top_k left out."""
        return self.total_params() - self.moe_layers * (self.experts - self.top_k) * self.expert_params()


def model_config_json(path: str | None) -> Path | None:
    """model.path's config.json on this machine: in the directory, or, for a Hugging Face Hub id,
    in Hugging Face's cache (nothing is fetched here)."""
    if not path:
        return None
    if (Path(path) / "config.json").exists():
        return Path(path) / "config.json"
    from .hub import hub_config_json, is_hub_id

    return hub_config_json(path, fetch=False)[0] if is_hub_id(path) else None


def architecture_of(cfg) -> Architecture | None:
    config_json = model_config_json(cfg.model.path)
    if config_json is not None:
        return Architecture.from_hf(json.loads(config_json.read_text()))
    facts = dict(cfg.model.hf_config_overrides)
    if cfg.task.name:  # a built-in task's vocabulary is its tokenizer's
        facts.setdefault("vocab_size", cfg.task.tokenizer_vocab)
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    mlp = "moe_intermediate_size" if facts.get("model_type") in ("qwen3_moe", "qwen2_moe") else "intermediate_size"
    return Architecture.from_hf(facts) if all(k in facts for k in needed + (mlp,)) else None


def split_problems(
    arch: Architecture, tp: int, pp: int, vpp: int | None = None, ep: int = 1, etp: int | None = None
) -> list[str]:
    """What megatron-core refuses when it cuts this model over tp x pp (x vpp) and ep x etp, one
    sentence each ([] when it splits): the one check behind --dry-run, launch-plan and convert.
    `arch` is an Architecture (from an HF config.json; no torch). The vocabulary needs no check:
    the output layer pads it to a multiple of tp (ArchSpec.padded_vocab)."""
    problems = []
    if not arch.experts and (ep > 1 or (etp or 1) > 1):
        problems.append(f"ep={ep}, etp={etp}: expert parallelism needs a mixture-of-experts model")
    elif arch.experts:
        etp = tp if etp is None else etp
        if arch.experts % ep:
            problems.append(f"num_experts={arch.experts} is not divisible by ep={ep}")
        if arch.moe_ffn % etp:
            problems.append(f"moe_intermediate_size={arch.moe_ffn} is not divisible by etp={etp}")
        if arch.shared_ffn and arch.shared_ffn % tp:
            problems.append(f"shared_expert_intermediate_size={arch.shared_ffn} is not divisible by tp={tp}")
    if arch.heads % tp:
        problems.append(f"num_attention_heads={arch.heads} is not divisible by tp={tp}")
    if arch.kv_heads % tp:
        problems.append(f"num_key_value_heads={arch.kv_heads} is not divisible by tp={tp}")
    if arch.ffn % tp and arch.moe_layers < arch.layers:  # a dense MLP somewhere
        problems.append(f"intermediate_size={arch.ffn} is not divisible by tp={tp}")
    stages = pp * (vpp or 1)
    if arch.layers % stages:
        problems.append(f"num_hidden_layers={arch.layers} is not divisible by pp*vpp={stages}")
    return problems


@dataclass
class MicroBatchShape:
    """What one (micro-batch, rank) feeds the model: the memory of a step follows from it."""

    tokens: int  # token slots of the row(s), padding included
    response_tokens: int  # positions whose next-token log-prob is taken
    attention_area: int  # sum over attention blocks of queries x keys (packed: each sequence's length^2; padded: each row's; CP: a rank's queries x length)


def activation_bytes(
    arch: Architecture,
    shape: MicroBatchShape,
    *,
    layers: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: bool = False,
    dtype_bytes: int = 2,
    flash_attention: bool = True,
    recompute_layers: int | None = None,
    etp: int = 1,
) -> float:
    """Bytes one micro-batch's layers keep for backward on one rank (see the module docstring).
    recompute_layers: of `layers`, how many are recomputed (block recompute; None = all)."""
    h, f, kv = arch.hidden, arch.ffn, arch.kv_heads * arch.head_dim
    outside_tp = 4 * h  # the norms' and the column-parallel linears' inputs: replicated unless SP
    inside_tp = (3 * h + 2 * kv + 3 * f) if flash_attention else (8 * h + 5 * f)
    per_token = (outside_tp / (tp if sequence_parallel else 1) + inside_tp / tp) * dtype_bytes
    statistics = 0 if flash_attention else arch.heads / tp * 4  # scaled_dot_product_attention's fp32 log-sum-exp
    layer = shape.tokens * (per_token + statistics)
    if arch.experts:  # the MoE layers' share of `layers`: their MLP keeps routed copies, not 3 ffn
        moe_count = min(layers, round(layers * arch.moe_layers / arch.layers))
        moe_layer = layer + shape.tokens * (
            moe_mlp_bytes_per_token(arch, tp, sequence_parallel, etp, dtype_bytes) - 3 * f / tp * dtype_bytes
        )
    else:
        moe_count, moe_layer = 0, layer
    kept = (layers - moe_count) * layer + moe_count * moe_layer
    redone = (layers if recompute_layers is None else min(layers, recompute_layers)) if recompute else 0
    if redone:  # a recomputed layer keeps its input; one layer's set exists again during its backward
        return (
            redone * shape.tokens * h / (tp if sequence_parallel else 1) * dtype_bytes
            + kept * (layers - redone) / layers
            + max(layer, moe_layer)
        )
    return kept


def moe_mlp_bytes_per_token(arch: Architecture, tp: int, sequence_parallel: bool, etp: int, dtype_bytes: int) -> float:
    """What an MoE layer's MLP keeps per token of the micro-batch: top_k routed copies of the expert
    input and output (h each), fc1's output (2 moe_ffn / etp) and the activation's (moe_ffn / etp),
    the router's fp32 logits and probabilities, and a shared expert's 3 ffn / tp (Qwen2-MoE)."""
    share = 1 / tp if sequence_parallel else 1  # the router sees this rank's sequence shard
    routed = arch.top_k * (2 * arch.hidden + 3 * arch.moe_ffn / etp) * dtype_bytes
    shared = 3 * arch.shared_ffn / tp * dtype_bytes
    return (routed + 2 * arch.experts * 4) * share + shared


def dispatcher_bytes(
    arch: Architecture, tokens: int, *, ep: int, tp: int, sequence_parallel: bool, dispatcher: str, dtype_bytes: int
) -> float:
    """One MoE layer's token exchange, alive while that layer runs: alltoall sends and receives
    tokens x top_k hidden states (balanced routing); allgather gathers every ep rank's tokens."""
    local = tokens / (tp if sequence_parallel else 1)
    if dispatcher == "allgather":
        return local * ep * (arch.hidden * dtype_bytes + arch.experts * 4)  # hidden states and routing probs
    return 2 * local * arch.top_k * arch.hidden * dtype_bytes


def output_layer_bytes(
    arch: Architecture, shape: MicroBatchShape, *, tp: int = 1, dtype_bytes: int = 2, fused: bool = True
) -> float:
    """Bytes of the last stage's output layer and log-prob computation beyond the activations."""
    vocab = math.ceil(arch.vocab / tp)
    if fused:
        tile = min(LOGITS_TILE_ELEMENTS, vocab * max(1, shape.response_tokens))
        tile_bytes = 2 * tile * (dtype_bytes + (4 if dtype_bytes < 4 else 0))  # and its gradient; + fp32 copies in bf16
        hidden = shape.response_tokens * arch.hidden * (dtype_bytes + 4)  # picked, and its fp32 gradient
        return tile_bytes + hidden + vocab * arch.hidden * 4  # + the output weight's gradient
    logits = shape.tokens * vocab * dtype_bytes
    picked = shape.response_tokens * vocab * 4
    return max(2 * logits, logits + 2 * picked)  # [s, b, V] and its transposed copy, or one and [N, V] + grad


def context_parallel_kv_bytes(
    arch: Architecture,
    tokens: int,
    *,
    cp: int,
    layers: int,
    tp: int = 1,
    dtype_bytes: int = 2,
    flash_attention: bool = True,
    kept_layers: int | None = None,
    attention_area: int = 0,
) -> float:
    """K/V that context parallelism adds on one rank for a micro-batch of `tokens` per rank: the local
    spec keeps the gathered K/V of the row (cp x tokens) for each layer that keeps activations
    (`kept_layers`, all by default) and one additive mask of `attention_area` (a rank's queries x
    their sequences' length) that every layer shares; TE's ring holds two K/V chunks of one layer in flight."""
    if cp <= 1:
        return 0.0
    row_kv = 2 * tokens * arch.kv_heads * arch.head_dim / tp * dtype_bytes  # one layer's K and V of a rank's share
    if flash_attention:
        return 2 * row_kv
    return (layers if kept_layers is None else kept_layers) * cp * row_kv + attention_area * dtype_bytes


@dataclass
class MemoryEstimate:
    rows: list[tuple[str, float, str]]  # (what, GB, how)
    total_gb: float
    capacity_gb: float
    params_total: int
    params_here: int
    without_te: str | None = None  # the local spec's figure, where it differs
    params_active: int | None = None  # mixture of experts: what one token passes through
    host_gb: float = 0.0  # optim.cpu_offload: the CPU optimizer's pinned host memory per rank

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.capacity_gb

    def dominant(self) -> str:
        """The largest part and what shrinks it: the model's state (weights, gradients, optimizer)
        needs more GPUs to shard it; activations need recompute, a smaller micro-batch or CP."""
        what, gb, _ = max(self.rows, key=lambda r: r[1])
        state = sum(r[1] for r in self.rows if r[0].split()[0] in ("weights", "gradients", "optimizer"))
        if state >= self.total_gb / 2:
            return (
                f"{what} is the largest part ({gb:.0f} GB; weights, gradients and optimizer state {state:.0f} GB): "
                "shard the model's state over more GPUs (more nodes, or higher tp/pp/ep)"
                + ("" if self.host_gb else ", or move the optimizer to the host (optim.cpu_offload: true)")
                + "; recompute does not shrink it"
            )
        return f"{what} is the largest part ({gb:.0f} GB): enable recompute, shrink the micro-batch, or raise tp/cp"

    def describe(self) -> str:
        active = f", {_count(self.params_active)} active per token" if self.params_active else ""
        lines = [
            f"parameters: {_count(self.params_total)} in all{active}, {_count(self.params_here)} on the heaviest GPU"
        ]
        width = max(len(r[0]) for r in self.rows)
        lines += [f"  {what:<{width}}  {gb:7.1f} GB  {how}" for what, gb, how in self.rows]
        verdict = "fits" if self.fits else f"does NOT fit: {self.dominant()}"
        lines.append(f"  {'total':<{width}}  {self.total_gb:7.1f} GB  of {self.capacity_gb:.0f} GB per GPU: {verdict}")
        if self.without_te:
            lines.append(f"  {self.without_te}")
        if self.host_gb:
            lines.append(
                f"  host memory per rank: {self.host_gb:.1f} GB, the CPU optimizer's (optim.cpu_offload, pinned)"
            )
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def recompute_layers(cfg, arch: Architecture | None, capacity_gb: float | None = None) -> int | None:
    """Layers per pipeline stage to recompute: 0 without recompute; model.recompute_layers when
    given; else the fewest whose estimate fits the GPU with room (recompute_margin_gb) for the
    estimate's error (all of them when none does). None = all (the architecture unknown)."""
    if not cfg.model.recompute_activations:
        return 0
    if cfg.model.recompute_layers is not None:
        return cfg.model.recompute_layers
    if arch is None:
        return None
    capacity = cfg.parallel.gpu_memory_gb if capacity_gb is None else capacity_gb
    per_stage = math.ceil(arch.layers / cfg.parallel.pp)
    if cfg.parallel.vpp and cfg.parallel.vpp > 1:
        return per_stage  # block recompute counts per virtual chunk: keep the simple plan there
    for n in range(per_stage + 1):
        estimate = estimate_memory(cfg, arch, capacity, recompute=n)
        if estimate.total_gb + recompute_margin_gb(estimate) <= capacity:
            return n
    return per_stage


def recompute_margin_gb(estimate: MemoryEstimate) -> float:
    """Room a sized recompute plan leaves for the estimate's error: ESTIMATE_BAND of what is
    estimated rather than counted (activations, output layer, CP's K/V, MoE buffers); weights,
    gradients and optimizer state are exact counts and the reserve row is its own margin."""
    counted = ("weights", "gradients", "optimizer", "reserve", "reference")
    return ESTIMATE_BAND * sum(gb for what, gb, _ in estimate.rows if not what.startswith(counted))


def estimate_memory(cfg, arch: Architecture, capacity_gb: float = 80.0, recompute: int | None = -1) -> MemoryEstimate:
    """recompute: layers per stage recomputed (-1: the run's plan, recompute_layers; None: all)."""
    if recompute == -1:
        recompute = recompute_layers(cfg, arch, capacity_gb)
    p, t, r, actor = cfg.parallel, cfg.train, cfg.rollout, cfg.actor
    tp, pp, dp = p.tp, p.pp, max(1, p.dp)
    per_stage_layers = math.ceil(arch.layers / pp)
    embed = arch.vocab * arch.hidden
    # the first stage holds the embedding, the last the output layer: one matrix on either end
    # stage when pp > 1 (tied embeddings keep a copy on each), both on the one stage when pp == 1
    ends = embed * (2 if pp == 1 and not arch.tied else 1)
    ep, etp = expert_parallel(cfg)
    moe_here = min(per_stage_layers, math.ceil(arch.moe_layers / pp))  # MoE layers on the heaviest stage
    dense_here = (
        (per_stage_layers - moe_here) * arch.layer_params() + moe_here * arch.moe_layer_dense_params() + ends
    ) // tp
    experts_here = moe_here * arch.experts * arch.expert_params() // (ep * etp)
    here = dense_here + experts_here
    model_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]
    weights = here * model_bytes
    grads = here * 4
    optimizer_per_param = 8 if model_bytes == 4 else 12  # (fp32 master +) Adam m, v
    shard = dp if cfg.optim.use_distributed_optimizer else 1
    # expert state is sharded over the expert-data-parallel ranks (the ranks holding the same experts)
    expert_dp = max(1, p.world_size // (pp * ep * etp)) if cfg.optim.use_distributed_optimizer else 1
    sharded = dense_here / shard + experts_here / expert_dp  # the parameters this rank's optimizer steps
    optimizer = sharded * optimizer_per_param
    o = cfg.optim
    offloaded = o.cpu_offload_fraction if o.cpu_offload else 0.0
    # of the offloaded share the GPU keeps the distributed optimizer's fp32 main shard (see the docstring)
    resident = 4 if model_bytes == 2 and not o.use_precision_aware_optimizer else 0
    optimizer_gpu = sharded * (optimizer_per_param * (1 - offloaded) + resident * offloaded)
    host = sharded * HOST_OPTIMIZER_BYTES * offloaded

    seq_len = cfg.data.max_prompt_tokens + r.max_new_tokens
    response_share = r.max_new_tokens / seq_len
    cp = p.cp
    if actor.max_tokens_per_micro_batch and actor.pack_sequences:
        tokens = actor.max_tokens_per_micro_batch
        # the budget filled with sequences as long as they can be; under CP a rank's queries
        # (1/cp of each sequence) attend to the whole sequence: the area per token is unchanged
        area = tokens * seq_len
        how_tokens = (
            f"{tokens} tokens per micro-batch per rank (packed{f', after the cp={cp} split' if cp > 1 else ''})"
        )
    else:
        sequences = math.ceil(actor.prompts_per_micro_batch * r.n_samples / dp)
        tokens, area = math.ceil(sequences * seq_len / cp), math.ceil(sequences * seq_len**2 / cp)
        how_tokens = f"{tokens} tokens per micro-batch per rank ({sequences} x {seq_len}" + (
            f" / cp={cp})" if cp > 1 else ")"
        )
    shape = MicroBatchShape(tokens=tokens, response_tokens=int(tokens * response_share), attention_area=area)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]
    micro_batches = (
        pp if actor.max_tokens_per_micro_batch else t.prompts_per_mini_batch // actor.prompts_per_micro_batch
    )
    in_flight = min(pp, max(1, micro_batches))  # a token budget's count varies: assume enough to fill the pipeline
    # Transformer Engine's flash attention for 16-bit models; float32 runs take the local spec
    # (actor/model.py), whose core attention is torch's scaled_dot_product_attention
    flash = cfg.model.dtype != "float32"

    def activations_with(flash_attention: bool) -> float:
        return in_flight * activation_bytes(
            arch,
            shape,
            layers=per_stage_layers,
            tp=tp,
            sequence_parallel=p.sequence_parallel,
            recompute=recompute != 0,
            dtype_bytes=dtype_bytes,
            flash_attention=flash_attention,
            recompute_layers=recompute,
            etp=etp,
        )

    activations = activations_with(flash)
    if recompute == 0:
        how_act = "no recompute" + (" (everything fits without)" if cfg.model.recompute_activations else "")
    elif recompute is None or recompute >= per_stage_layers:
        how_act = "full recompute"
    else:
        how_act = f"block recompute of {recompute} of {per_stage_layers} layers per stage" + (
            "" if cfg.model.recompute_layers is not None else " (the fewest that fit)"
        )
    attention = (
        "flash attention (Transformer Engine)"
        if flash
        else "local spec attention (torch's scaled_dot_product_attention, float32 model)"
    )
    logits = output_layer_bytes(arch, shape, tp=tp, dtype_bytes=dtype_bytes, fused=actor.fused_output_layer)
    experts_how = (
        f"; experts: {arch.experts // ep} of {arch.experts} per rank (ep={ep}), each cut etp={etp} ways, "
        f"{_count(experts_here)} of {_count(here)} parameters"
        if arch.experts
        else ""
    )
    rows = [
        (
            f"weights ({cfg.model.dtype})",
            weights / GB,
            f"tp={tp}, pp={pp}: {per_stage_layers} layers per stage{experts_how}",
        ),
        ("gradients (fp32 main_grad)", grads / GB, "full buffer on every DP rank"),
        (
            "optimizer (Adam)",
            optimizer_gpu / GB,
            f"{optimizer_per_param} B/param"
            + (f", sharded over dp={dp}" if shard > 1 else ", not sharded")
            + (f" (experts over expert-dp={expert_dp})" if arch.experts and shard > 1 else "")
            + (
                f"; {'all' if offloaded == 1 else f'{offloaded:g}'} of it on the host (optim.cpu_offload; "
                f"{optimizer / GB:.1f} GB in all), {resident} B/param of that share kept here"
                if offloaded
                else ""
            ),
        ),
        ("activations", activations / GB, f"{how_tokens}, {how_act}, {in_flight} in flight, {attention}"),
        (
            "output layer and loss",
            logits / GB,
            "fused: logit tiles, picked hidden states, output-weight gradient"
            if actor.fused_output_layer
            else "naive: [tokens, V/tp] logits and their gradient",
        ),
        ("reserve", RESERVE_GB, "CUDA context, NCCL, fragmentation"),
    ]

    def gathered_kv(flash_attention: bool) -> float:
        kept = (
            per_stage_layers
            if not recompute
            else (per_stage_layers - min(per_stage_layers, recompute or per_stage_layers) + 1)
        )
        return in_flight * context_parallel_kv_bytes(
            arch,
            tokens,
            cp=cp,
            layers=per_stage_layers,
            tp=tp,
            dtype_bytes=dtype_bytes,
            flash_attention=flash_attention,
            kept_layers=kept,
            attention_area=area,
        )

    if cp > 1:
        rows.insert(
            -1,
            (
                "context-parallel K/V",
                gathered_kv(flash) / GB,
                f"cp={cp}: "
                + (
                    "two K/V chunks per layer in flight (TE's ring)"
                    if flash
                    else "every kept layer's K/V gathered over the CP group (local spec)"
                ),
            ),
        )
    if arch.experts:
        rows.insert(
            -1,
            (
                "MoE dispatcher buffers",
                dispatcher_bytes(
                    arch,
                    tokens,
                    ep=ep,
                    tp=tp,
                    sequence_parallel=p.sequence_parallel,
                    dispatcher=cfg.model.moe_dispatcher,
                    dtype_bytes=dtype_bytes,
                )
                / GB,
                f"{cfg.model.moe_dispatcher}: one layer's token exchange (balanced routing)",
            ),
        )
    if cfg.algorithm.kl == "reference":
        rows.insert(-1, reference_row(weights, activations + logits, actor.reference_offload))
    total = sum(gb for _, gb, _ in rows)
    without_te = None
    if flash:  # the same run on GPUs without Transformer Engine: the local spec's attention scores
        extra = (activations_with(False) - activations + gathered_kv(False) - gathered_kv(True)) / GB
        without_te = (
            "without Transformer Engine (local spec: torch's scaled_dot_product_attention, megatron's "
            f"unfused layers{', K/V gathered over CP' if cp > 1 else ''}): activations +{extra:.1f} GB, "
            f"total {total + extra:.1f} GB"
        )
    return MemoryEstimate(
        rows,
        total,
        capacity_gb,
        arch.total_params(),
        here,
        without_te,
        arch.active_params() if arch.experts else None,
        host / GB,
    )


def expert_parallel(cfg) -> tuple[int, int]:
    """(parallel.ep, parallel.etp), etp null meaning tp; (1, 1) before a config has them."""
    p = cfg.parallel
    ep = getattr(p, "ep", 1) or 1
    etp = getattr(p, "etp", None)
    return ep, (p.tp if etp is None else etp)


# room sized recompute leaves for the estimate's error, as a share of what it estimates (activations,
# output layer): on CPU the estimate came at most 5% below torch's allocator peak over every shape
# measured (tests/integration/test_memory_measured.py, docs/actor.md); the rest of the 25% is for
# what a CPU cannot show (GPU kernels' workspaces, bf16 copies, allocator fragmentation)
ESTIMATE_BAND = 0.25
FULLY_RESHARDABLE_MAX_GB = 8.0  # host memory one rank may gather for a fully reshardable optimizer save


def optimizer_format(cfg, arch: Architecture | None) -> tuple[str, str]:
    """(checkpoint.optimizer_format to use, why): `auto` takes fully_reshardable (any layout, any
    spec) while the optimizer state gathered on one host per DP group stays small, else
    dp_reshardable (each rank its own shard)."""
    chosen = cfg.checkpoint.optimizer_format
    if chosen != "auto":
        return chosen, "checkpoint.optimizer_format"
    if arch is None:
        return "fully_reshardable", "auto: model size unknown"
    p = cfg.parallel
    shard_params = arch.total_params() / (p.tp * p.pp)
    gathered = shard_params * 12 / GB  # fp32 master + Adam m, v of one model-parallel shard
    if gathered <= FULLY_RESHARDABLE_MAX_GB:
        return "fully_reshardable", f"auto: {gathered:.1f} GB of optimizer state per model-parallel shard"
    return "dp_reshardable", (
        f"auto: {gathered:.0f} GB of optimizer state per model-parallel shard would be gathered "
        f"on one host (> {FULLY_RESHARDABLE_MAX_GB:.0f} GB); resharding to another tp/pp needs "
        "checkpoint.optimizer_format=fully_reshardable"
    )


def checkpoint_optimizer_format(cfg) -> str:
    """The optimizer format a run's checkpoints are written in (see optimizer_format)."""
    return optimizer_format(cfg, architecture_of(cfg))[0]


def reference_row(weights: float, update_peak: float, offload: bool) -> tuple[str, float, str]:
    """The frozen reference model's share (bytes in, a row out): resident, or offloaded between passes."""
    if not offload:
        return (
            "reference model (kl)",
            weights / GB,
            "frozen initial weights, resident (actor.reference_offload: false)",
        )
    return (
        "reference model (kl)",
        max(0.0, weights - update_peak) / GB,
        f"offloaded to host between passes: its {weights / GB:.1f} GB sit in the update's activation room "
        "during the log-prob pass",
    )


def server_memory(cfg, arch: Architecture, capacity_gb: float = 80.0) -> tuple[str, bool]:
    """(what one server GPU holds: weights and the KV-cache room left, whether the room holds the
    longest rollout)."""
    r = cfg.rollout
    weights = arch.total_params() * 2 / r.server_tp / GB
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2 / r.server_tp
    room = max(0.0, capacity_gb * 0.85 - weights)  # SGLang's static memory fraction, roughly
    tokens = room * GB / kv_per_token
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    fits = tokens >= longest
    return (
        f"SGLang server GPU: weights {weights:.1f} GB (bf16, tp={r.server_tp}); about {room:.0f} GB of KV cache "
        f"= {tokens / 1e3:.0f}k tokens = {tokens / longest:.0f} rollouts of {longest} tokens at once"
        + ("" if fits else ": does NOT fit one rollout (raise rollout.server_tp)"),
        fits,
    )


# --- the colocated layout (rollout.colocate): the servers and the actor take turns on each GPU -------

SERVER_RELEASED_GB = 1.5  # a released SGLang server keeps its CUDA context and allocator's bookkeeping
COLOCATED_MARGIN_GB = 2.0  # kept free between the actor's resident share and the servers' static fraction


def colocated_mem_fraction(capacity_gb: float) -> float:
    """SGLang's --mem-fraction-static for a server beside an offloaded actor: the GPU less the actor's
    resident share (RESERVE_GB: CUDA context, NCCL's buffers, which stay) and a margin."""
    return round((capacity_gb - RESERVE_GB - COLOCATED_MARGIN_GB) / capacity_gb, 3)


def server_mem_fraction(cfg) -> tuple[float, str]:
    """The static fraction a colocated server runs with and where it comes from: rollout.server_args'
    --mem-fraction-static when given (engine_setup.server_args passes it unchanged), else
    colocated_mem_fraction."""
    args = list(cfg.rollout.server_args)
    for i, arg in enumerate(args):
        if arg == "--mem-fraction-static" and i + 1 < len(args):
            return float(args[i + 1]), "rollout.server_args"
        if arg.startswith("--mem-fraction-static="):
            return float(arg.split("=", 1)[1]), "rollout.server_args"
    return colocated_mem_fraction(cfg.parallel.gpu_memory_gb), "the plan's"


def colocated_plan(cfg, arch: Architecture, estimate: MemoryEstimate) -> tuple[list[tuple[str, float, str]], list[str]]:
    """The colocated layout per phase: rows (what, GB, how) for one GPU's training peak (servers
    released) and generation peak (server weights, KV cache, the actor's resident share), and for one
    node's host memory (the actor's parameters and optimizer state while the servers generate, and
    the CPU optimizer's share with optim.cpu_offload; its gradients are dropped); and what does not
    fit, naming the phase and what to change."""
    r, p = cfg.rollout, cfg.parallel
    capacity = estimate.capacity_gb
    row = {what: gb for what, gb, _ in estimate.rows}
    train_peak = estimate.total_gb + SERVER_RELEASED_GB
    fraction, fraction_from = server_mem_fraction(cfg)
    server_weights = arch.total_params() * 2 / r.server_tp / GB
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2 / r.server_tp
    kv_room = max(0.0, capacity * fraction - server_weights)
    tokens = kv_room * GB / kv_per_token
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    generation_peak = RESERVE_GB + capacity * fraction
    weights = next(gb for what, gb in row.items() if what.startswith("weights"))
    # what the actor moves out while the servers generate, and the CPU optimizer's share (always there)
    host = p.gpus_per_node * (weights + row["optimizer (Adam)"] + estimate.host_gb)
    rows = [
        (
            "training peak (servers released)",
            train_peak,
            f"the actor's estimate above + {SERVER_RELEASED_GB} GB a released server keeps",
        ),
        (
            "generation peak",
            generation_peak,
            f"server weights {server_weights:.1f} GB (bf16, tp={r.server_tp}) + KV cache {kv_room:.1f} GB "
            f"(--mem-fraction-static {fraction}, {fraction_from}) + the actor's resident {RESERVE_GB:.0f} GB (CUDA context, NCCL); "
            f"{tokens / 1e3:.0f}k tokens = {tokens / longest:.0f} rollouts of {longest}",
        ),
        (
            "host memory per node",
            host,
            f"{p.gpus_per_node} ranks x (weights {weights:.1f} + optimizer {row['optimizer (Adam)']:.1f} GB"
            + (f" + the CPU optimizer {estimate.host_gb:.1f} GB" if estimate.host_gb else "")
            + "), pinned, kept between steps; gradients are dropped",
        ),
    ]
    problems = []
    if train_peak > capacity:
        problems.append(
            f"the colocated training phase (servers released) needs about {train_peak:.0f} GB of {capacity:.0f} GB "
            "per GPU: raise tp/pp/ep, shard the optimizer over more ranks, or enable recompute"
        )
    if tokens < longest:
        problems.append(
            f"the colocated generation phase has KV-cache room for {tokens:.0f} tokens per server, fewer than one "
            f"rollout of {longest}: raise rollout.server_tp"
        )
    return rows, problems
