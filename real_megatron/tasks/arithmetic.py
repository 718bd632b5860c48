"""A verifiable task a tiny model learns in minutes on a CPU: a±b±c with two worked steps.

    prompt:   "47+38-25="
    response: "47+38=85;85-25=60;\\boxed{60}" then <eos>

Everything is made offline from a seed: the problems (train and held-out never overlap), a BPE
tokenizer trained on the task's text, and a supervised warm-start of a tiny Qwen2 model (cached on
disk by its settings) that RL then improves. The reward is exact integer match of the last
\\boxed{} (same extraction as the math verifier, without its symbolic machinery).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from ..rewards.math import extract_answer

log = logging.getLogger(__name__)
EOS, PAD = "<eos>", "<pad>"


def problem(rng: random.Random, max_operand: int = 99) -> tuple[str, str, int]:
    a, b, c = (rng.randint(1, max_operand) for _ in range(3))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    first = a + b if op1 == "+" else a - b
    answer = first + c if op2 == "+" else first - c
    prompt = f"{a}{op1}{b}{op2}{c}="
    solution = f"{a}{op1}{b}={first};{first}{op2}{c}={answer};\\boxed{{{answer}}}"
    return prompt, solution, answer


def split(n_train: int, n_eval: int, seed: int, max_operand: int = 99):
    """(train, held-out) lists of (prompt, solution, answer); held-out prompts never seen in train."""
    rng = random.Random(seed)
    seen, train, held = set(), [], []
    while len(held) < n_eval:
        p = problem(rng, max_operand)
        if p[0] not in seen:
            seen.add(p[0])
            held.append(p)
    while len(train) < n_train:
        p = problem(rng, max_operand)
        if p[0] not in seen:
            seen.add(p[0])
            train.append(p)
    return train, held


def write_jsonl(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for prompt, _, answer in items:
            f.write(json.dumps({"prompt": prompt, "answer": str(answer)}) + "\n")
    return path


def build_tokenizer(out_dir: Path, corpus: list[str], vocab_size: int = 64):
    """A byte-level-free BPE trained on the task's text, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # characters, then merges of them
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def reward(response: str, ground_truth, **_) -> float:
    """1.0 when the last \\boxed{} holds exactly the integer answer."""
    answer = extract_answer(response)
    return 1.0 if answer is not None and answer.strip() == str(ground_truth).strip() else 0.0


def warm_start(out_dir: Path, model_config: dict, tokenizer, train, *, steps: int, batch: int, lr: float,
               seed: int, progress: bool = True) -> Path:
    """Supervised warm-start from scratch (prompt + solution + eos, loss on the solution), cached:
    a directory that already holds the checkpoint is reused."""
    import transformers

    if (out_dir / "model.safetensors").exists():
        return out_dir
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**model_config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    rng = random.Random(seed)
    iterator = range(steps)
    if progress:
        from ..progress import progress as bar

        iterator = bar(iterator, desc="warm-start (supervised)", unit="step", leave=False)
    for step in iterator:
        lr_now = lr * min(1.0, (step + 1) / 100)  # constant after warm-up: RL continues from a live lr
        for group in opt.param_groups:
            group["lr"] = lr_now
        rows, labels = [], []
        for prompt, solution, _ in rng.sample(train, batch):
            p = tokenizer.encode(prompt, add_special_tokens=False)
            s = tokenizer.encode(solution, add_special_tokens=False) + [eos]
            rows.append(p + s)
            labels.append([-100] * len(p) + s)
        width = max(map(len, rows))
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress and step % 50 == 0:
            iterator.set_postfix(loss=f"{loss.item():.3f}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


WARMSTART_RECIPE = 2  # bump when warm_start changes, so cached checkpoints are not reused


def settings_key(*parts) -> str:
    return hashlib.sha256(json.dumps([WARMSTART_RECIPE, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]
