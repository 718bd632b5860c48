"""Log-probs of given responses as the actor computes them (megatron model + token_logprobs kernel).

    python tests/support/actor_logprobs.py --hf DIR --pairs pairs.json --out logprobs.json [--temperature T]
pairs.json: [[prompt_ids, response_ids], ...]; log-probs under softmax(logits / T), as the actor's
logprob_temperature computes them.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec, build_model_chunks, transformer_config
    from real_megatron.actor.weights import load_hf_weights
    from real_megatron.convert.hf_io import HFCheckpointReader
    from real_megatron.kernels import token_logprobs

    init_distributed(timeout_s=120)
    spec = ArchSpec.from_pretrained(args.hf)
    (model,) = build_model_chunks(spec, transformer_config(spec))
    load_hf_weights([model], spec, HFCheckpointReader(args.hf, spec).get)
    out = []
    with torch.no_grad():
        for prompt, response in json.loads(Path(args.pairs).read_text()):
            ids = torch.tensor([prompt + response])
            logits = model(ids, torch.arange(ids.shape[1])[None], None)[0]  # [s, V]
            picked = logits[len(prompt) - 1 : -1, : spec.vocab_size]
            out.append(token_logprobs(picked.float() / args.temperature, torch.tensor(response)).tolist())
    Path(args.out).write_text(json.dumps(out))
    shutdown()


if __name__ == "__main__":
    main()
