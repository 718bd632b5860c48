#!/usr/bin/env python
"""Logits of the Megatron model built from an HF checkpoint vs transformers' model, same input.

    python tools/check_parity.py --hf DIR
    torchrun --nproc_per_node 2 tools/check_parity.py --hf DIR --tp 2
    torchrun --nproc_per_node 2 tools/check_parity.py --hf MOE_DIR --ep 2      # experts over 2 ranks

Prints the max |delta logit| over fixed prompts (deterministic random token ids) and exits
non-zero when it exceeds --tolerance (default 1e-4, for float32 checkpoints).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF checkpoint directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel (mixture-of-experts models)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: --tp)")
    parser.add_argument(
        "--dispatcher", choices=("alltoall", "allgather"), default="alltoall", help="MoE token dispatcher"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=48)
    args = parser.parse_args()

    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state as ps

    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec, build_model_chunks, transformer_config
    from real_megatron.actor.weights import load_hf_weights
    from real_megatron.convert.hf_io import HFCheckpointReader
    from real_megatron.rollout.local import dtype_kwarg

    init_distributed(tp=args.tp, ep=args.ep, etp=args.etp, timeout_s=300)
    spec = ArchSpec.from_pretrained(args.hf)
    reader = HFCheckpointReader(args.hf, spec)
    chunks = build_model_chunks(
        spec, transformer_config(spec, tp=args.tp, ep=args.ep, etp=args.etp, moe_dispatcher=args.dispatcher)
    )
    load_hf_weights(chunks, spec, reader.get)
    for chunk in chunks:
        chunk.eval()  # inference: no MoE aux loss, and MoE under TP needs no sequence parallelism
    device = next(chunks[0].parameters()).device  # the GPU this rank is bound to, or the CPU
    reference = (
        transformers.AutoModelForCausalLM.from_pretrained(args.hf, **dtype_kwarg(torch.float32)).eval().to(device)
    )

    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)
    with torch.no_grad():
        expect = reference(ids).logits.float()
        local = chunks[0](ids, positions, None).float()
    if args.tp > 1:
        shards = [torch.empty_like(local) for _ in range(args.tp)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(shards, dim=-1)
    diff = (local[..., : spec.vocab_size] - expect).abs().max().item()
    ok = diff <= args.tolerance
    if dist.get_rank() == 0:
        print(
            f"{spec.family} tp={args.tp} ep={args.ep} etp={args.etp or args.tp}: max |delta logit| = {diff:.3e} over {args.batch}x{args.seq} tokens "
            f"({'OK' if ok else 'OVER'} tolerance {args.tolerance:g})"
        )
    shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
