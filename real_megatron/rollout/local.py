"""The embedded engine (`rollout.backend: local`): transformers' generate in this process.

For one machine without a GPU: the policy's weights arrive in memory through the same streaming
export the SGLang fleet uses (HF-named tensors), generation uses the KV cache and sampling of
transformers' `generate`, and each token's log-prob under the distribution it was sampled from
(softmax of logits / temperature; top-p not renormalised) comes back with it, as SGLang's
return_logprob reports it. For a mixture-of-experts model each sample also carries the experts
its tokens were routed to (rollout/routing.py), captured from transformers' routers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from .routing import RouterCapture, RoutingShape
from .types import Sample, SamplingParams

# the streaming export's per-expert (on-disk) names; transformers keeps one stacked tensor per layer
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def _in_memory_target(state: dict, name: str) -> tuple[str, torch.Tensor]:
    """(what is written, the tensor to copy into) for an exported HF name: the parameter itself, or
    one expert's slice of transformers' stacked expert tensors (gate_up_proj [E, 2 f, h]: gate rows
    then up rows, as transformers merges checkpoints on load; down_proj [E, h, f])."""
    if name in state:
        return name, state[name]
    match = _EXPERT.fullmatch(name)
    if match is None or f"{match[1]}.down_proj" not in state:
        raise KeyError(f"embedded engine: the exported tensor {name!r} is not a parameter of the model")
    prefix, expert, kind = match[1], int(match[2]), match[3]
    if kind == "down":
        return f"{prefix}.down_proj[{expert}]", state[f"{prefix}.down_proj"][expert]
    fused = state[f"{prefix}.gate_up_proj"][expert]
    half = fused.shape[0] // 2
    return f"{prefix}.gate_up_proj[{expert}].{kind}", fused[:half] if kind == "gate" else fused[half:]


def _slices(tensor: torch.Tensor, name: str) -> int:
    """How many exported tensors fill a stacked expert tensor."""
    return tensor.shape[0] * (2 if name.endswith("gate_up_proj") else 1)


def dtype_kwarg(dtype) -> dict:
    """transformers' dtype argument: `dtype` since 4.56 (`torch_dtype` is deprecated there, with a
    warning on every load), `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


class InMemoryWeights:
    """The embedded engine's path: the whole model on rank 0, handed over in memory (small models)."""

    def send(self, actor, engine, version: int) -> None:
        state = actor.gather_hf_state_dict()  # a collective; the full model on rank 0 only
        if engine is not None:
            engine.update_weights(state.items(), version)

    def close(self) -> None:
        pass


class LocalEngine:
    def __init__(
        self,
        hf_config=None,
        *,
        model=None,
        pad_token_id: int = 0,
        dtype: torch.dtype = torch.float32,
        max_batch_sequences: int = 256,
        seed: int = 0,
    ):
        """A fresh model of `hf_config`'s architecture (an HF config or its dict), or `model`: an
        existing HF model to generate with (its weights shared, not copied)."""
        if model is None:
            import transformers

            config = hf_config if not isinstance(hf_config, dict) else transformers.AutoConfig.for_model(**hf_config)
            model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwarg(dtype))
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.max_batch_sequences = max_batch_sequences
        self.version = 0
        self.weights = InMemoryWeights()  # how a trainer's weights reach it (see weight_sync.py)
        self.generator = torch.Generator().manual_seed(seed)
        # MoE models: samples carry their routed experts (None: a dense model)
        self.routing = RoutingShape.of_hf_config(self.model.config)

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        pad_token_id: int = 0,
        dtype: torch.dtype = torch.float32,
        max_batch_sequences: int = 256,
        seed: int = 0,
    ) -> LocalEngine:
        """An engine holding an HF checkpoint's weights (evaluation of a saved model)."""
        import transformers

        return cls(
            model=transformers.AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype)),
            pad_token_id=pad_token_id,
            max_batch_sequences=max_batch_sequences,
            seed=seed,
        )

    @property
    def weight_version(self) -> int:
        return self.version

    def load_weights(self, actor, version: int) -> None:
        """The actor's weights (a collective over the trainer's ranks; rank 0 holds this engine)."""
        self.weights.send(actor, self, version)

    def close(self) -> None:
        """Nothing outlives the process: the model is this process's memory."""

    @torch.no_grad()
    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        state = self.model.state_dict()
        seen = set()
        for name, tensor in tensors:
            name, target = _in_memory_target(state, name)
            if target.shape != tensor.shape:
                raise ValueError(
                    f"embedded engine: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add(name)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = {n for n in state if not n.endswith(("experts.gate_up_proj", "experts.down_proj"))} - seen - tied
        missing |= {
            f"{n} (expert slices)"
            for n in state
            if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
            and sum(s.startswith(n + "[") for s in seen) != _slices(state[n], n)
        }
        if missing:
            raise KeyError(f"embedded engine: the update lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        jobs = [(p, k) for p in range(len(prompts)) for k in range(n)]
        generator = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        results: list[list[Sample]] = [[None] * n for _ in prompts]  # type: ignore[list-item]
        per_call = max(1, self.max_batch_sequences)
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            for (p, k), sample in zip(chunk, self._generate([prompts[p] for p, _ in chunk], params, generator)):
                sample.prompt_index, sample.sample_index = p, k
                results[p][k] = sample
        return results

    def _generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator) -> list[Sample]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        stop = list(params.stop_token_ids)
        sampling = params.temperature > 0
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        capture = RouterCapture(self.model, self.routing) if self.routing else nullcontext()
        with capture:
            out = self._run_generate(ids, mask, params, sampling, stop)
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()  # [batch, steps, vocab], raw
        if sampling:  # the distribution sampled from, as SGLang reports it (greedy: the raw one)
            logits = logits / params.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, new.unsqueeze(2)).squeeze(2)
        samples, lengths = [], []
        for i in range(len(prompts)):
            tokens = new[i].tolist()
            end = next((j + 1 for j, t in enumerate(tokens) if t in stop), None)
            finish = "stop" if end is not None else "length"
            end = end or len(tokens)
            lengths.append(end)
            samples.append(Sample(-1, -1, tokens[:end], logprobs[i, :end].tolist(), finish, self.version))
        if self.routing:
            routed = capture.per_sequence(len(prompts), width, [len(p) for p in prompts], lengths)
            for sample, experts in zip(samples, routed):
                sample.routed_experts = experts
        return samples

    def _run_generate(self, ids, mask, params: SamplingParams, sampling: bool, stop: list[int]):
        return self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=stop or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
