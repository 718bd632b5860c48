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
from dataclasses import dataclass
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


def split(n_train: int, n_eval: int, seed: int, max_operand: int = 99, n_dev: int = 0):
    """(train, held-out, dev) lists of (prompt, solution, answer), pairwise disjoint by prompt: dev
    steers the warm-start, held-out measures RL, train feeds both."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh(count: int) -> list:
        out = []
        while len(out) < count:
            p = problem(rng, max_operand)
            if p[0] not in seen:
                seen.add(p[0])
                out.append(p)
        return out

    held = fresh(n_eval)
    train = fresh(n_train)
    dev = fresh(n_dev)
    return train, held, dev


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


@dataclass(frozen=True)
class WarmStartPlan:
    """How long the supervised warm-start trains. With a target band it stops at the first check
    whose dev pass@1 lies in [low, high], so RL starts from a comparable model on any machine and
    seed (a fixed step count reaches 0.24 on one CPU and 0.63 on another); without, exactly
    max_steps."""

    max_steps: int
    batch: int
    lr: float
    target: tuple[float, float] | None = (0.55, 0.65)
    check_every: int = 100
    dev_k: int = 2  # samples per dev prompt (temperature 1, as the held-out evaluation)
    max_new_tokens: int = 40


class WarmStartError(RuntimeError):
    pass


def dev_pass1(model, tokenizer, dev, k: int, max_new_tokens: int, seed: int) -> float:
    """Sampled pass@1 (temperature 1, k per prompt) of an HF model on the dev problems."""
    from ..data.dataset import Example
    from ..evaluation import evaluate_sets
    from ..rollout.local import LocalEngine
    from ..rollout.types import SamplingParams

    engine = LocalEngine.wrapping(model, pad_token_id=tokenizer.pad_token_id)
    examples = [Example([], answer, f"dev:{i}", prompt_ids=tokenizer.encode(prompt, add_special_tokens=False))
                for i, (prompt, _, answer) in enumerate(dev)]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=(tokenizer.convert_tokens_to_ids(EOS),), seed=seed)
    result = evaluate_sets(engine, tokenizer, {"dev": examples}, reward, k, params)
    model.train()
    return result["pass1"]


def warm_start(out_dir: Path, model_config: dict, tokenizer, train, dev, plan: WarmStartPlan, *, seed: int,
               progress: bool = True) -> dict:
    """Supervised warm-start from scratch (prompt + solution + eos, loss on the solution), cached:
    a directory that already holds the checkpoint is reused. Returns what it did (also saved as
    warmstart.json beside the weights): steps, dev pass@1 at every check."""
    import transformers

    record_file = out_dir / "warmstart.json"
    if (out_dir / "model.safetensors").exists():
        return json.loads(record_file.read_text()) if record_file.exists() else {}
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**model_config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.01)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    rng = random.Random(seed)
    checks: list[tuple[int, float]] = []
    iterator = range(plan.max_steps)
    if progress:
        from ..progress import progress as bar

        iterator = bar(iterator, desc="warm-start (supervised)", unit="step", leave=False)
    reached = None
    for step in iterator:
        lr_now = plan.lr * min(1.0, (step + 1) / 100)  # constant after warm-up: RL continues from a live lr
        for group in opt.param_groups:
            group["lr"] = lr_now
        rows, labels = [], []
        for prompt, solution, _ in rng.sample(train, plan.batch):
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
        if plan.target is not None and (step + 1) % plan.check_every == 0:
            score = dev_pass1(model, tokenizer, dev, plan.dev_k, plan.max_new_tokens, seed=seed * 100_003 + step)
            checks.append((step + 1, score))
            log.info("warm-start step %d: dev pass@1 %.3f (target %.2f-%.2f)", step + 1, score, *plan.target)
            if plan.target[0] <= score <= plan.target[1]:
                reached = step + 1
                break
            if score > plan.target[1]:
                raise WarmStartError(
                    f"warm-start: dev pass@1 went from {checks[-2][1] if len(checks) > 1 else 0:.3f} to {score:.3f} "
                    f"between steps {step + 1 - plan.check_every} and {step + 1}, past the target band "
                    f"{plan.target[0]:.2f}-{plan.target[1]:.2f}: check more often (task.warmstart_check_every) "
                    "or widen the band (task.warmstart_target)")
        if progress and step % 50 == 0:
            iterator.set_postfix(loss=f"{loss.item():.3f}", **({"dev": f"{checks[-1][1]:.3f}"} if checks else {}))
    if progress:
        iterator.close()
    if plan.target is not None and reached is None:
        raise WarmStartError(
            f"warm-start: dev pass@1 did not reach the target band {plan.target[0]:.2f}-{plan.target[1]:.2f} within "
            f"task.warmstart_max_steps={plan.max_steps} steps (dev pass@1 at the last checks: "
            f"{', '.join(f'{s}: {v:.3f}' for s, v in checks[-4:])}); raise the cap or lower the band")
    record = {"steps": reached or plan.max_steps, "dev_checks": checks, "target": plan.target,
              "dev_pass1": checks[-1][1] if checks else None, "dev_prompts": len(dev)}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps(record, indent=1))
    if out_dir.exists():  # a directory left by an interrupted run without weights
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return record


WARMSTART_RECIPE = 3  # bump when warm_start changes, so cached checkpoints are not reused


def settings_key(*parts) -> str:
    return hashlib.sha256(json.dumps([WARMSTART_RECIPE, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]
