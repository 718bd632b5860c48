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


def split(n_train: int, n_eval: int, seed: int, max_operand: int = 99, n_dev: int = 0, make=problem):
    """(train, held-out, dev) lists of (prompt, solution, answer), pairwise disjoint by prompt: dev
    steers the warm-start, held-out measures RL, train feeds both. `make(rng, max_operand)` draws
    one problem (another task's generator for its own split)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh(count: int) -> list:
        out = []
        while len(out) < count:
            p = make(rng, max_operand)
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
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False)
    )
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
    seed (a fixed 3,000 steps reached 0.24 on one CPU and 0.63 on another: the curve has a sharp
    rise whose onset varies); without one, exactly max_steps."""

    max_steps: int
    batch: int
    lr: float
    target: tuple[float, float] | None = (0.55, 0.65)
    check_every: int = 200  # steps between dev checks far below the band; a quarter of it near it
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

    engine = LocalEngine(model=model, pad_token_id=tokenizer.pad_token_id)
    examples = [
        Example([], answer, f"dev:{i}", prompt_ids=tokenizer.encode(prompt, add_special_tokens=False))
        for i, (prompt, _, answer) in enumerate(dev)
    ]
    params = SamplingParams(
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        stop_token_ids=(tokenizer.convert_tokens_to_ids(EOS),),
        seed=seed,
    )
    result = evaluate_sets(engine, tokenizer, {"dev": examples}, reward, k, params)
    model.train()
    return result["pass1"]


class _Trainer:
    """The supervised loop's state (model, AdamW, sampling of examples), which can be saved at a
    check and rolled back to it."""

    def __init__(self, model_config: dict, tokenizer, train, plan: WarmStartPlan, seed: int, encode=None):
        import transformers

        torch.manual_seed(seed)
        self.model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**model_config))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=plan.lr, weight_decay=0.01)
        self.tokenizer, self.train, self.plan = tokenizer, train, plan
        self.eos = tokenizer.convert_tokens_to_ids(EOS)
        self.rng = random.Random(seed)
        self.step = 0
        self.encode = encode or self.encode_solution

    def encode_solution(self, item) -> tuple[list[int], list[int]]:
        """(ids, labels) of one example: the prompt (no loss), then the solution and eos."""
        prompt, solution, _ = item
        p = self.tokenizer.encode(prompt, add_special_tokens=False)
        s = self.tokenizer.encode(solution, add_special_tokens=False) + [self.eos]
        return p + s, [-100] * len(p) + s

    def one_step(self) -> float:
        lr_now = self.plan.lr * min(1.0, (self.step + 1) / 100)  # constant after warm-up: RL continues from a live lr
        for group in self.opt.param_groups:
            group["lr"] = lr_now
        rows, labels = [], []
        for item in self.rng.sample(self.train, self.plan.batch):
            ids, lab = self.encode(item)
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.eos] * (width - len(r)) for r in rows])
        lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        loss = self.model(input_ids=ids, labels=lab).loss
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        return loss.item()

    def snapshot(self) -> tuple:
        import copy

        return (
            self.step,
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.opt.state_dict()),
            self.rng.getstate(),
        )

    def restore(self, snap: tuple) -> None:
        import copy

        self.step = snap[0]
        self.model.load_state_dict(snap[1])
        self.opt.load_state_dict(copy.deepcopy(snap[2]))
        self.rng.setstate(snap[3])


def warm_start(
    out_dir: Path,
    model_config: dict,
    tokenizer,
    train,
    dev,
    plan: WarmStartPlan,
    *,
    seed: int,
    progress: bool = True,
    encode=None,
    evaluate=None,
) -> dict:
    """Supervised warm-start from scratch (prompt + solution + eos, loss on the solution), cached:
    a directory that already holds the checkpoint is reused. Returns what it did (also saved as
    warmstart.json beside the weights): steps, dev pass@1 at every check.

    Checks come every `check_every` steps, every quarter of that once dev pass@1 is within 0.2 of
    the band. A check past the band goes back to the previous check and continues with checks
    four times as frequent (down to every 5 steps), so the run lands in the band rather than past it.

    encode(item) -> (ids, labels) and evaluate(model, seed) -> dev pass@1 replace the single-turn
    example and check (the tool task's traces and its multi-turn dev check)."""
    record_file = out_dir / "warmstart.json"
    if (out_dir / "model.safetensors").exists():
        return json.loads(record_file.read_text()) if record_file.exists() else {}
    run = _Trainer(model_config, tokenizer, train, plan, seed, encode)
    checks: list[tuple[int, float]] = []
    interval, next_check, below, reached = plan.check_every, plan.check_every, None, None
    bar = None
    if progress:
        from ..progress import progress as make_bar

        bar = make_bar(total=plan.max_steps, desc="warm-start (supervised)", unit="step", leave=False)
    while run.step < plan.max_steps:
        loss = run.one_step()
        if bar is not None:
            bar.update(1)
            if run.step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", **({"dev": f"{checks[-1][1]:.3f}"} if checks else {}))
        if plan.target is None or run.step < next_check:
            continue
        low, high = plan.target
        check_seed = seed * 100_003 + run.step
        if evaluate is not None:
            score = evaluate(run.model, check_seed)
            run.model.train()
        else:
            score = dev_pass1(run.model, tokenizer, dev, plan.dev_k, plan.max_new_tokens, seed=check_seed)
        checks.append((run.step, score))
        log.info("warm-start step %d: dev pass@1 %.3f (target %.2f-%.2f)", run.step, score, low, high)
        if low <= score <= high:
            reached = run.step
            break
        if score > high and below is not None and interval > 5:
            interval = max(5, interval // 4)
            log.info(
                "warm-start: past the band at step %d; back to step %d, checking every %d steps",
                run.step,
                below[0],
                interval,
            )
            run.restore(below)
            if bar is not None:
                bar.n = run.step
        elif score > high:
            raise WarmStartError(
                f"warm-start: dev pass@1 {score:.3f} at step {run.step} is past the target band {low:.2f}-{high:.2f} "
                f"(checks: {', '.join(f'{s}: {v:.3f}' for s, v in checks[-4:])}); widen the band "
                "(task.warmstart_target) or check earlier (task.warmstart_check_every)"
            )
        else:
            below = run.snapshot()
            if score >= low - 0.2:
                interval = min(interval, max(5, plan.check_every // 4))
        next_check = run.step + interval
    if bar is not None:
        bar.close()
    if plan.target is not None and reached is None:
        raise WarmStartError(
            f"warm-start: dev pass@1 did not reach the target band {plan.target[0]:.2f}-{plan.target[1]:.2f} within "
            f"task.warmstart_max_steps={plan.max_steps} steps (last checks: "
            f"{', '.join(f'{s}: {v:.3f}' for s, v in checks[-4:])}); raise the cap or lower the band"
        )
    record = {
        "steps": run.step,
        "dev_pass1": checks[-1][1] if checks else None,
        "target": plan.target,
        "dev_prompts": len(dev),
        "dev_k": plan.dev_k,
        "dev_checks": checks,
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    run.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps(record, indent=1))
    if out_dir.exists():  # left by an interrupted run, without weights
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return record


WARMSTART_RECIPE = 3  # bump when warm_start changes, so cached checkpoints are not reused


def settings_key(*parts) -> str:
    return hashlib.sha256(json.dumps([WARMSTART_RECIPE, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]
