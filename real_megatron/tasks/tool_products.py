"""A tool-using task a tiny model learns on a CPU: products a×b (a of two digits, b of two or three)
that it cannot work out in its head, but can with the python tool.

    prompt:       "47*385="
    model turn 1: <tool_call>{"name":"python","arguments":{"code":"47*385"}}</tool_call> then <eos>
    tool result:  [18095]                      (the sandbox's output, by the task's chat template)
    model turn 2: \\boxed{18095} then <eos>

Everything is made offline from a seed, as the arithmetic task's (arithmetic.py): the problems
(train, held-out and dev never overlap), a BPE tokenizer with a small chat template of its own, and
a supervised warm-start on traces of the conversation above, the tool's result spliced in by the
chat template exactly as the rollouts splice it (trajectory.ChatGlue), the loss on the model's
turns only. A share of the traces (DIRECT_PERCENT) answers in one turn without the tool, so the
warm-started model sometimes skips the tool and guesses; caught mid-way by the dev band, it also
copies operands wrongly. RL has both to fix. The reward is arithmetic.reward (the last \\boxed{}).

The template renders a user turn as its text, an assistant turn as its text and <eos>, a tool
turn as [its output]; it ignores `tools=` (the model learns the call format from the traces, not
from a schema in its prompt: 128 positions leave no room for one).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

from .arithmetic import EOS, PAD
from .arithmetic import split as arithmetic_split

DIRECT_PERCENT = 30  # share of warm-start traces that answer without the tool
RECIPE = 1  # bump when the traces or the tokenizer change, so cached warm-starts are not reused
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'] }}" + EOS + "{%- elif m['role'] == 'tool' -%}"
    "{{ '[' + (m['content'] | trim) + ']' }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}"
)


def call_text(a: int, b: int) -> str:
    code = json.dumps({"name": "python", "arguments": {"code": f"{a}*{b}"}}, separators=(",", ":"))
    return f"<tool_call>{code}</tool_call>"


def problem(rng: random.Random, max_operand: int = 999) -> tuple[str, str, int]:
    """(prompt, the first model turn of a tool-using trace, answer)."""
    a, b = rng.randint(10, 99), rng.randint(10, max_operand)
    return f"{a}*{b}=", call_text(a, b), a * b


def split(n_train: int, n_eval: int, seed: int, max_operand: int = 999, n_dev: int = 0):
    """(train, held-out, dev) lists of (prompt, first turn, answer), pairwise disjoint by prompt."""
    return arithmetic_split(n_train, n_eval, seed, max_operand, n_dev, make=problem)


def direct(prompt: str) -> bool:
    """Whether the warm-start trace of `prompt` answers without the tool (fixed by the prompt)."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100 < DIRECT_PERCENT


def build_tokenizer(out_dir: Path, corpus: list[str], vocab_size: int = 96):
    """BPE over the task's text with every printable ASCII character in its alphabet (tool errors
    and other text the sandbox writes encode too). Digits and punctuation are tokens of their own,
    so no merge crosses a turn's boundary (the chat template's assembly is append-only by ids);
    letter runs merge ("python", "arguments", "boxed")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Fuse()
    alphabet = sorted(set(string.printable) - set("\x0b\x0c"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def corpus(train) -> list[str]:
    return [p + call + f"[{answer}]\\boxed{{{answer}}}" for p, call, answer in train[:4000]]


class TraceEncoder:
    """(ids, labels) of a warm-start trace, assembled as a rollout assembles a trajectory: the
    prompt by the chat template, each model turn's ids then <eos>, the tool's result between them
    by the template's append-only glue; labels only on the model's ids."""

    def __init__(self, tokenizer):
        from ..agents.tool_calls import tool_message
        from ..agents.tools import PYTHON_SCHEMA
        from ..agents.trajectory import ChatGlue, check_append_only, render

        self.tokenizer, self.render, self.tool_message = tokenizer, render, tool_message
        self.eos = tokenizer.convert_tokens_to_ids(EOS)
        self.glue = ChatGlue(tokenizer, (self.eos,), [PYTHON_SCHEMA])
        check_append_only(self.glue)

    def turn(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.eos]

    def __call__(self, item) -> tuple[list[int], list[int]]:
        prompt, call, answer = item
        ids = self.render(self.tokenizer, [{"role": "user", "content": prompt}], True, self.glue.tools)
        labels = [-100] * len(ids)
        answer_turn = self.turn(f"\\boxed{{{answer}}}")
        if direct(prompt):
            return ids + answer_turn, labels + answer_turn
        first = self.turn(call)
        between = self.glue.between([self.tool_message("python", f"{answer}\n")])  # as the sandbox prints it
        ids = ids + first + between + answer_turn
        labels = labels + first + [-100] * len(between) + answer_turn
        return ids, labels


def dev_evaluator(tokenizer, dev, runner, k: int, max_new_tokens: int):
    """evaluate(model, seed) -> sampled pass@1 (temperature 1, k per prompt) of an HF model on the
    dev problems, as trajectories through `runner` (the run's tool environment and turn limits)."""
    from ..data.dataset import Example
    from ..evaluation import evaluate_sets
    from ..rollout.local import LocalEngine
    from ..rollout.types import SamplingParams
    from .arithmetic import reward

    def evaluate(model, seed: int) -> float:
        engine = LocalEngine(model=model, pad_token_id=tokenizer.pad_token_id)
        examples = []
        for i, (prompt, _, answer) in enumerate(dev):
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            examples.append(Example(messages, str(answer), f"dev:{i}", prompt_ids=ids))
        params = SamplingParams(
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            stop_token_ids=(tokenizer.convert_tokens_to_ids(EOS),),
            seed=seed,
        )
        return evaluate_sets(engine, tokenizer, {"dev": examples}, reward, k, params, runner=runner)["pass1"]

    return evaluate
