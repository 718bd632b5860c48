"""A multi-turn trajectory, token in, token out.

A trajectory is the prompt's ids followed by segments: the model's turns (the ids it sampled, with
the engine's log-probs: trainable) and what came between them (tool results, environment or user
turns, the chat template's glue: not trainable). The ids the actor trains on are exactly the ids
sampled: a model turn is never decoded and re-encoded. Its text is decoded only for the
environment to read.

The tokens between turns come from the chat template applied as an append-only suffix
(`ChatGlue`): the template renders a fixed conversation ending with an assistant turn, then the same
conversation with the new messages appended (and the next assistant header); the ids the second
rendering adds after the first are the glue, preceded by whatever the template puts after the
assistant's end-of-turn token (Qwen's "\\n" after <|im_end|>). That is right only if the template
is append-only: rendering a conversation so far and then appending messages must give the ids of
rendering it whole. `check_append_only` verifies it once per tokenizer, on a probe conversation
with the run's tools, and refuses a template that is not (naming the first id where they differ);
`ChatGlue` also refuses any single suffix whose base rendering is not a prefix. A tokenizer without
a chat template gets plain text, as single-turn prompts do (data/dataset.py's render_prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class TemplateError(ValueError):
    """The chat template cannot be applied as an append-only suffix."""


def render(tokenizer, messages: list[dict], generation_prompt: bool, tools: Optional[list[dict]]) -> list[int]:
    """The conversation's ids by the tokenizer's chat template; without one, as data/dataset.py's
    render_prompt does (the messages' contents joined by newlines)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode("\n".join(m["content"] for m in messages), add_special_tokens=False)
    kwargs = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _where(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.decode(ids[max(0, at - 12) : at + 12]))


# the fixed conversation glue is rendered after: the template's output after an assistant turn
# does not depend on what was said before (what check_append_only verifies)
_BASE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


class ChatGlue:
    """The ids between one model turn and the next, from the tokenizer's chat template."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...], tools: Optional[list[dict]] = None):
        self.tokenizer, self.tools, self.stop_ids = tokenizer, tools, tuple(stop_ids)
        # without a chat template (the built-in task's tokenizer) the conversation is plain text, as
        # single-turn prompts are: each message after a model turn on a line of its own
        self.plain = not getattr(tokenizer, "chat_template", None)
        if self.plain:
            if tools:
                raise TemplateError(
                    "tools are offered to the model through its chat template's tool format; the tokenizer "
                    f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template"
                )
            self.after_stop, self._base = [], []
            return
        base = render(tokenizer, _BASE, False, tools)
        ends = [i for i, t in enumerate(base) if t in self.stop_ids]
        # what the template writes after the assistant's end-of-turn token (the model stops at it)
        self.after_stop = base[ends[-1] + 1 :] if ends else []
        self._base = base
        self._cache: dict = {}

    def between(self, messages: list[dict]) -> list[int]:
        """Ids after a model turn that ended with its stop token: `messages` (tool results, user or
        environment turns) and the next assistant turn's header."""
        if self.plain:
            text = "".join("\n" + m["content"] for m in messages)
            return self.tokenizer.encode(text, add_special_tokens=False) if text else []
        base = self._base
        whole = render(self.tokenizer, _BASE + list(messages), True, self.tools)
        if whole[: len(base)] != base:
            at = next((i for i, (a, b) in enumerate(zip(base, whole)) if a != b), len(base))
            raise TemplateError(
                f"the chat template of {getattr(self.tokenizer, 'name_or_path', '') or type(self.tokenizer).__name__} "
                f"is not append-only: appending {[m.get('role') for m in messages]} messages changes id {at} of the "
                f"conversation before them ({_where(self.tokenizer, base, at)} became "
                f"{_where(self.tokenizer, whole, at)}); multi-turn rollouts need a template whose rendering of a "
                "conversation so far is a prefix of the rendering with more messages"
            )
        return self.after_stop + whole[len(base) :]

    def assistant_ids(self, content: str) -> list[int]:
        """The ids of an assistant turn as the model would sample them (content, then its stop
        token), by the template: for the append-only check's probe."""
        head = render(self.tokenizer, _BASE[:1], True, self.tools)
        full = render(self.tokenizer, _BASE[:1] + [{"role": "assistant", "content": content}], False, self.tools)
        if full[: len(head)] != head:
            raise TemplateError("the chat template's assistant turn does not follow its generation prompt")
        turn = full[len(head) :]
        return turn[: len(turn) - len(self.after_stop)] if self.after_stop else turn


def check_append_only(glue: ChatGlue, prompt: Optional[list[dict]] = None) -> None:
    """Turn-by-turn assembly (prompt with the generation prompt, the model's turns as sampled, the
    glue between them) must give the ids of rendering the whole conversation at once; a
    TemplateError names the first id where they part. A template that re-renders earlier turns (one
    that drops earlier reasoning, say) fails here: the model would be trained on contexts it never
    sees at inference."""
    tok = glue.tokenizer
    if glue.plain:  # plain text: appended, never re-rendered, by construction
        return
    conversation = list(prompt or [{"role": "user", "content": "What is 12 * 34?"}])
    # with reasoning, as reasoning models write it: a template that drops earlier turns' reasoning
    # (Qwen3's, when user turns come between the model's) is not append-only
    replies = ["<think>\nTimes.\n</think>\n\nLet me compute it.", "It is 408."]
    between = [{"role": "tool", "content": "408"}] if glue.tools else [{"role": "user", "content": "Sure?"}]
    ids = render(tok, conversation, True, glue.tools)
    ids += glue.assistant_ids(replies[0]) + glue.between(between) + glue.assistant_ids(replies[1])
    whole_messages = conversation + [
        {"role": "assistant", "content": replies[0]},
        *between,
        {"role": "assistant", "content": replies[1]},
    ]
    whole = render(tok, whole_messages, False, glue.tools)
    whole = whole[: len(whole) - len(glue.after_stop)] if glue.after_stop else whole
    if ids != whole:
        at = next((i for i, (a, b) in enumerate(zip(ids, whole)) if a != b), min(len(ids), len(whole)))
        raise TemplateError(
            f"the chat template of {getattr(tok, 'name_or_path', '') or type(tok).__name__} is not append-only: "
            f"rendering the conversation turn by turn and rendering it whole part at id {at} "
            f"(turn by turn {_where(tok, ids, at)}, whole {_where(tok, whole, at)}); the tokens between turns "
            "would differ from what the template gives the model at inference. Use a template that renders earlier "
            "turns unchanged (e.g. Qwen2.5's; Qwen3's drops earlier turns' reasoning: pass a template without that)"
        )


@dataclass
class Trajectory:
    """One trajectory as it grows: `ids` after the prompt, `mask` True where the model sampled the
    id, `logprobs` the engine's (0.0 where the model did not sample), `turns` what each segment was
    (for rollouts.jsonl), and how it ended."""

    prompt_ids: list[int]
    max_response: int = 0  # at most this many ids after the prompt (0: the runner's limits only)
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    model_turns: int = 0
    weight_version: Optional[int] = None  # the oldest of its turns
    finish: str = ""  # "done" (the environment ended it), "turns", "tokens" (limits), "length" (a turn cut)
    reward: Optional[float] = None  # the environment's; None: the verifier labels the last model turn
    last_reply: str = ""  # the last model turn's text (what the environment read)
    last_turn_ids: list[int] = field(default_factory=list)  # its ids (the verifier decodes them)
    server: Optional[int] = None  # the server its turns went to (the fleet keeps a trajectory on one)
    routed: list = field(default_factory=list)  # per model turn: (first fed position, experts tensor)
    stats: dict = field(default_factory=dict)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.ids

    @property
    def truncated(self) -> bool:
        return self.finish in ("turns", "tokens", "length")

    def add_model_turn(self, ids: list[int], logprobs: Optional[list[float]], text: str, version: int) -> None:
        if logprobs is not None and len(logprobs) != len(ids):
            logprobs = None
        self.ids += ids
        self.mask += [True] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        if logprobs is None:
            self.stats["turns_without_logprobs"] = self.stats.get("turns_without_logprobs", 0) + 1
        self.turns.append({"role": "assistant", "content": text, "tokens": len(ids)})
        self.model_turns += 1
        self.last_reply, self.last_turn_ids = text, list(ids)
        self.weight_version = version if self.weight_version is None else min(self.weight_version, version)

    def add_between(self, ids: list[int], messages: list[dict]) -> None:
        self.ids += ids
        self.mask += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        for m in messages:
            self.turns.append({"role": m.get("role"), "content": m.get("content")})

    def cut(self, length: int) -> None:
        """Keep the first `length` ids after the prompt (the token budget)."""
        del self.ids[length:], self.mask[length:], self.logprobs[length:]
