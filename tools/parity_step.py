#!/usr/bin/env python
"""REAL updates of a fixed tiny Qwen2-style model under any (TP, PP, DP, micro-batch) layout.

    python tools/parity_step.py --tp 1 --pp 1 --micro-batches 1 --out a.safetensors
    torchrun --nproc_per_node 2 tools/parity_step.py --tp 2 --pp 1 --micro-batches 1 --out b.safetensors

The model (4 layers, untied embeddings, GQA) comes from the seed alone, in HF layout, so every
layout starts from the same weights. Each step is one rollout batch of 8 prompt groups x 4 rollouts
(mixed labels, different lengths, made from seed + step), groups split over DP ranks when DP > 1;
old log-probs are recomputed, then one REAL update (tau 0.5, AdamW, fp32, grad clip 1.0). Rank 0 writes all
parameters, gathered to full HF-named tensors, to --out (safetensors). --steps 0 writes the initial
parameters. Files of different layouts must agree to max relative difference <= 1e-5.
--cp C splits each packed sequence over C context-parallel ranks; --short-rollouts adds rollouts of
2-3 tokens (below 2C for C >= 2). --multi-turn marks a middle third of each response as tokens
between the model's turns (in the sequence, out of the loss). --layout NAME="ARGS" (repeatable) runs several layouts in one
launch, one after another on the same processes (ARGS added to the command line's), writing
--out/NAME.safetensors and printing "layout NAME: step ...": process start-up paid once.
--save/--load write/read a checkpoint after/before the steps (resume check). --kl reference adds a
KL term to the seed's initial model (the frozen reference, on the same layout), --kl old to pi_old.
The actor's data path is its default (packed rows, fused output layer, micro-batches of whole
groups); --padded, --naive-output-layer and --max-tokens select the others for comparison.
--hf DIR trains that HF checkpoint instead of the seed's model (e.g. a tiny Qwen3-MoE); with a
mixture-of-experts model --ep/--etp spread its experts, --moe-aux-loss-coef sets the
load-balancing loss (default: the HF config's) and --dispatcher picks megatron's token dispatcher.
--routing-replay (with an MoE --hf) gives every rollout the experts transformers routes its tokens
to on CPU (an engine's report) and replays them (actor.routing_replay=rollout).
--optimizer-format FORMAT|auto:CONFIG writes --save's optimizer state in that format (auto: the
pick of checkpoint.optimizer_format=auto for CONFIG's model and layout).
Each step's line carries first_update_s_abs_max, |s̄| at its first update (0: old log-probs and the
training forward agree exactly); --require-zero-s makes a non-zero value an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

GROUPS, ROLLOUTS, VOCAB = 8, 4, 256
MODEL = dict(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.05,
)


def synthetic_rollouts(seed: int, step: int, short: bool = False, multi_turn: bool = False):
    """short: group 0's rollouts are 2-3 tokens (a 1-token prompt, 1-2 response tokens).
    multi_turn: each response is model / between / model tokens (a mask; the same ids)."""
    from real_megatron.rollout.types import Rollout

    gen = torch.Generator().manual_seed(seed * 1000 + step)
    rollouts = []
    for g in range(GROUPS):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        if short and g == 0:
            prompt = prompt[:1]
        rewards = [1.0, 0.0] + [float(x) for x in torch.randint(0, 2, (ROLLOUTS - 2,), generator=gen)]
        if g == GROUPS - 1:
            rewards = [1.0] * ROLLOUTS  # one uniform group
        for reward in rewards:
            length = int(torch.randint(2, 11, (1,), generator=gen))
            if short and g == 0:
                length = 1 + length % 2
            response = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
            rollouts.append(Rollout(prompt, response, reward, g))
            if multi_turn and length >= 3:  # a third the model's, a third between its turns, the rest its again
                a, b = max(1, length // 3), length // 3
                rollouts[-1].response_mask = [j < a or j >= a + b for j in range(length)]
    return rollouts


def transformers_routing(hf_dir: str, rollouts) -> None:
    """Give each rollout the experts transformers' model (float32, CPU) routes its tokens to, as an
    engine reports them: one row per fed token (all but the last), [tokens - 1, MoE layers, k]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        for r in rollouts:
            ids = list(r.prompt_ids) + list(r.response_ids)
            logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # per MoE layer
            experts = torch.stack([layer.reshape(len(ids), -1).topk(k, dim=-1).indices for layer in logits], 1)
            r.routed_experts = experts[:-1].to(torch.uint8)


def optimizer_format_of(value: str) -> tuple[str, str]:
    """(format, why) from FORMAT or auto:CONFIG (the pick checkpoint.optimizer_format=auto makes there)."""
    if not value.startswith("auto:"):
        return value, "given"
    from real_megatron.config import load_config
    from real_megatron.memory import architecture_of, optimizer_format

    cfg = load_config(value[5:])
    return optimizer_format(cfg, architecture_of(cfg))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--cp", type=int, default=1, help="context parallelism: each packed sequence over cp ranks")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    # Small lr: Adam's first steps are about +-lr wherever |grad| >> eps, so rounding noise in
    # near-zero gradients moves parameters by up to ~lr; 2e-5 keeps that far below 1e-5 relative.
    parser.add_argument("--lr", type=float, default=2e-5)
    # --adam-eps 1 makes the update ~ lr * grad (|grad| << eps): parameters then check gradients
    # themselves, including their scale, which Adam's normalised first step would hide.
    # (with --clip-grad 0: clipping would normalise the gradient's scale away again)
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallelism (tp >= 2)")
    parser.add_argument("--tied", action="store_true", help="tie the output layer to the embedding")
    parser.add_argument("--padded", action="store_true", help="right-padded rows instead of packed sequences")
    parser.add_argument("--naive-output-layer", action="store_true", help="GPTModel's logits instead of the fused path")
    parser.add_argument(
        "--max-tokens", type=int, help="micro-batches by this token budget per rank (instead of --micro-batches)"
    )
    parser.add_argument("--kl", choices=["none", "reference", "old"], default="none", help="KL term of the loss")
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--save", help="write a checkpoint here after the steps")
    parser.add_argument("--load", help="resume from this checkpoint before the steps")
    parser.add_argument(
        "--init-from",
        help="start from these weights instead of the seed: an HF checkpoint "
        "directory or a megatron dist checkpoint (e.g. from `real-megatron convert`)",
    )
    parser.add_argument("--write-hf", help="also write the seed's initial model as an HF checkpoint here")
    parser.add_argument("--recompute", action="store_true", help="recompute every layer's activations in backward")
    parser.add_argument("--short-rollouts", action="store_true", help="prompt group 0 of 2-3 token rollouts")
    parser.add_argument(
        "--multi-turn",
        action="store_true",
        help="responses of model and between-turn tokens (only the model's trained)",
    )
    parser.add_argument("--hf", help="train this HF checkpoint directory instead of the seed's tiny model")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel (mixture-of-experts models)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: --tp)")
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--moe-aux-loss-coef", type=float, default=None, help="default: the HF config's")
    parser.add_argument("--routing-replay", action="store_true", help="MoE: replay transformers' routing (CPU)")
    parser.add_argument("--optimizer-format", default="fully_reshardable", help="FORMAT or auto:CONFIG (with --save)")
    parser.add_argument("--require-zero-s", action="store_true", help="exit 1 unless s̄ = 0 at every first update")
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help="run this layout too (several: one after another in this launch); --out is then a directory",
    )
    return parser


def main() -> int:
    import shlex

    parser = make_parser()
    args = parser.parse_args()
    if not args.layout:
        return run_layout(parser, args)
    os.makedirs(args.out, exist_ok=True)
    for item in args.layout:
        name, _, extra = item.partition("=")
        layout = parser.parse_args(sys.argv[1:] + shlex.split(extra))
        layout.layout, layout.out = [], os.path.join(args.out, f"{name}.safetensors")
        run_layout(parser, layout, prefix=f"layout {name}: ", last=item is args.layout[-1])
    return 0


def run_layout(parser, args, prefix: str = "", last: bool = True) -> int:
    """One layout's steps and files; `last`: end the process group after (else only megatron's groups)."""
    if GROUPS % args.micro_batches:
        parser.error(f"--micro-batches must divide the {GROUPS} prompt groups")

    from safetensors.torch import save_file

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.checkpoint import load_checkpoint, save_checkpoint
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import OptimConfig, ParallelConfig
    from real_megatron.convert.hf_io import HFCheckpointReader
    from real_megatron.objectives import build_objective

    init_distributed(
        tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, timeout_s=300, seed=args.seed, ep=args.ep, etp=args.etp
    )
    model = dict(MODEL, tie_word_embeddings=args.tied)
    spec = ArchSpec.from_pretrained(args.hf) if args.hf else ArchSpec.from_hf(model, "parity model")
    # Non-zero biases: the k_proj bias has an exactly zero gradient (softmax is shift-invariant), so
    # Adam turns its rounding noise into +-lr steps; from zero that noise would be the whole tensor.
    weights = init_hf_state_dict(spec, args.seed, bias_std=spec.initializer_range)
    settings = ActorSettings(
        parallel=ParallelConfig(
            tp=args.tp, pp=args.pp, vpp=args.vpp, sequence_parallel=args.sequence_parallel, ep=args.ep, etp=args.etp
        ),
        optim=OptimConfig(lr=args.lr, adam_eps=args.adam_eps, weight_decay=0.01, clip_grad=args.clip_grad),
        groups_per_mini_batch=GROUPS,
        total_steps=100,
        recompute_activations=args.recompute,
        actor=ActorConfig(
            prompts_per_micro_batch=GROUPS // args.micro_batches,
            max_tokens_per_micro_batch=args.max_tokens,
            pack_sequences=not args.padded,
            fused_output_layer=not args.naive_output_layer,
            routing_replay="rollout" if args.routing_replay else "none",
        ),
        moe_dispatcher=args.dispatcher,
        moe_aux_loss_coef=args.moe_aux_loss_coef,
    )
    if args.write_hf and torch.distributed.get_rank() == 0:
        os.makedirs(args.write_hf, exist_ok=True)
        save_file(weights, os.path.join(args.write_hf, "model.safetensors"))
        with open(os.path.join(args.write_hf, "config.json"), "w") as f:
            json.dump(dict(model, architectures=["Qwen2ForCausalLM"], torch_dtype="float32"), f, indent=1)
    source = weights.__getitem__
    if args.hf:
        source = HFCheckpointReader(args.hf, spec).get
    if args.init_from:
        if os.path.exists(os.path.join(args.init_from, "metadata.json")):
            source = args.init_from  # megatron dist checkpoint
        else:
            source = HFCheckpointReader(args.init_from, spec).get
    objective = build_objective("real", tau=0.5, skip_uniform_groups=True, kl=args.kl, kl_coef=args.kl_coef)
    actor = Actor(spec, settings, objective, source)
    start = 0
    if args.load:
        start = load_checkpoint(actor, args.load)["step"]
    nonzero_s = False
    for step in range(start, start + args.steps):
        rollouts = synthetic_rollouts(args.seed, step, args.short_rollouts, args.multi_turn)
        if args.routing_replay:
            transformers_routing(args.hf, rollouts)
        metrics = actor.train_step(rollouts)
        s_first = metrics.get("first_update_score_abs_max", float("nan"))
        nonzero_s |= s_first != 0.0
        if torch.distributed.get_rank() == 0:
            print(
                f"{prefix}step {step}: loss {metrics['loss']:.10e} grad_norm {metrics['grad_norm']:.10e} "
                f"micro_batches {metrics['micro_batches']} first_update_s_abs_max {s_first:.3e}"
                + (
                    f" routing_mismatch_frac {metrics['routing_mismatch_frac']:.4f}"
                    if "routing_mismatch_frac" in metrics
                    else ""
                )
                + (f" kl_mean {metrics['kl_mean']:.10e}" if args.kl != "none" else "")
                + (
                    f" moe_aux_loss {metrics['moe_aux_loss']:.10e} moe_expert_load_max {metrics['moe_expert_load_max']:.6f}"
                    if "moe_aux_loss" in metrics
                    else ""
                ),
                flush=True,
            )
    if args.save:
        fmt, why = optimizer_format_of(args.optimizer_format)
        if torch.distributed.get_rank() == 0:
            print(f"{prefix}optimizer format {fmt} ({args.optimizer_format}: {why})", flush=True)
        save_checkpoint(actor, args.save, {"step": start + args.steps}, optimizer_format=fmt)
    state = actor.gather_hf_state_dict()
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, args.out)
    if args.require_zero_s and nonzero_s:
        print(f"{prefix}FAIL: s̄ was not 0 at a first update (old log-probs and the training forward differ)")
        return 1
    if last:
        shutdown()
    else:  # the next layout builds megatron's groups anew on the same processes
        from megatron.core import parallel_state

        del actor
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
