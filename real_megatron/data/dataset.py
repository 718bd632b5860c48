"""Prompt datasets: verl parquet files as they are, and jsonl; chat templates; resumable order.

verl / DeepScaleR parquet rows: `prompt` (a list of chat messages), `reward_model.ground_truth`
(string, number or list of strings), `data_source`. jsonl rows: {"prompt" or "messages", "answer"}.
A malformed row is an error naming the file and the row (or, with skip_malformed, counted and
skipped). Prompts longer than max_prompt_tokens are dropped with a count. The order is a
permutation per epoch from (seed, epoch), so a position (epoch, index) resumes exactly.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError):
    """A data file or row that cannot be read as a prompt and its ground truth (file and row named)."""

    kind = "data error"


@dataclass
class Example:
    messages: list[dict]  # chat messages, role/content
    ground_truth: Any
    source: str  # "file:row"
    data_source: str = ""
    prompt_ids: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)
    extra_info: Any = None  # the row's extra_info, for verl-style reward functions


def _lookup(row: dict, dotted: str):
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        f"{where}: prompt must be a string or a list of {{role, content}} messages, got {str(value)[:120]!r}"
    )


_NO_TRUTH = {"none", "nan", "null"}  # what None and NaN become when a file is written as text


def usable_truth(truth) -> bool:
    """A ground truth the math verifier can compare with: a non-empty string (not "None", "nan" or
    "null"), a finite number, or a non-empty list of them."""
    if isinstance(truth, bool):
        return False
    if isinstance(truth, (int, float)):
        return math.isfinite(truth)
    if isinstance(truth, str):
        return bool(truth.strip()) and truth.strip().lower() not in _NO_TRUTH
    if isinstance(truth, (list, tuple)):
        return bool(truth) and all(usable_truth(t) for t in truth)
    return False


def _any_truth(truth) -> bool:
    """A ground truth for a reward function of one's own: anything but None, NaN or empty."""
    if truth is None or (isinstance(truth, float) and math.isnan(truth)):
        return False
    return bool(truth.strip()) if isinstance(truth, str) else not (isinstance(truth, (list, tuple, dict)) and not truth)


def read_rows(path: str | Path, max_rows: int | None = None) -> list:
    """The rows of one file (its first max_rows when given): mappings, or a DataError in place of a
    row that cannot be read (so skip_malformed can count it and keep the others)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give the data files themselves (e.g. {path}/train.parquet)")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if max_rows is None:
                rows = pq.read_table(path).to_pylist()
            else:
                batch = next(pq.ParquetFile(path).iter_batches(batch_size=max_rows), None)
                rows = batch.to_pylist() if batch is not None else []
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open("rb") as f:
            for number, raw in enumerate(f):
                if max_rows is not None and len(rows) >= max_rows:
                    break
                if not raw.strip():
                    continue
                try:
                    rows.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError as exc:
                    rows.append(DataError(f"{path}: row {number}: not UTF-8 ({exc.reason} at byte {exc.start})"))
                except json.JSONDecodeError as exc:
                    rows.append(DataError(f"{path}: row {number}: not valid JSON ({exc.msg})"))
    else:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .parquet or .jsonl)")
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def load_examples(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "reward_model.ground_truth",
    skip_malformed: bool = False,
    math_truths: bool = True,
    max_rows: int | None = None,
) -> tuple[list[Example], int]:
    """All examples of one file (its first max_rows: --dry-run's look), and how many malformed rows
    were skipped. math_truths: ground truths the math verifier can compare with (strings, finite
    numbers, lists of them; not None, NaN, "None", "nan"); otherwise anything but None, NaN or empty
    (a reward function of one's own gets dicts and lists as they are)."""
    usable = usable_truth if math_truths else _any_truth
    examples, skipped = [], 0
    for number, row in enumerate(read_rows(path, max_rows)):
        where = f"{path}: row {number}"
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a mapping, got {type(row).__name__}")
            keys = (prompt_key, "messages") if prompt_key == "prompt" else (prompt_key,)
            prompt = next((row[k] for k in keys if k in row), None)
            if prompt is None:
                raise DataError(f"{where}: no {' or '.join(repr(k) for k in keys)} field (fields: {', '.join(row)})")
            try:
                truth = _lookup(row, answer_key)
            except KeyError:
                truth = row.get("answer")
            if hasattr(truth, "tolist"):
                truth = truth.tolist()
            if not usable(truth):
                found = "none" if truth is None else repr(truth)[:80]
                expected = (
                    "a non-empty string, a finite number, or a list of them, for the math verifier"
                    if math_truths
                    else "anything but None, NaN or empty"
                )
                raise DataError(
                    f"{where}: no usable ground truth at {answer_key!r} or 'answer' (found {found}; expected {expected})"
                )
            examples.append(
                Example(
                    _messages(prompt, where),
                    truth,
                    f"{path}:{number}",
                    str(row.get("data_source", "")),
                    extra_info=row.get("extra_info"),
                )
            )
        except DataError as exc:
            if not skip_malformed:
                raise DataError(
                    f"{exc}; fix or drop the row, or set data.skip_malformed=true to skip such rows"
                ) from None
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed rows", path, skipped)
    return examples, skipped


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat-formatted prompt, ready for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
    # no template: the conversation as plain text
    return tokenizer.encode("\n".join(m["content"] for m in messages), add_special_tokens=False)


class PromptDataset:
    """Examples from several files, tokenised, filtered by length, in a resumable shuffled order."""

    def __init__(
        self,
        files,
        tokenizer,
        *,
        max_prompt_tokens: int = 1024,
        seed: int = 1,
        shuffle: bool = True,
        prompt_key: str = "prompt",
        answer_key: str = "reward_model.ground_truth",
        skip_malformed: bool = False,
        math_truths: bool = True,
    ):
        self.examples: list[Example] = []
        self.skipped_malformed = 0
        self.dropped_long = 0
        for file in files:
            examples, skipped = load_examples(
                file,
                prompt_key=prompt_key,
                answer_key=answer_key,
                skip_malformed=skip_malformed,
                math_truths=math_truths,
            )
            self.skipped_malformed += skipped
            for ex in examples:
                ex.prompt_ids = render_prompt(tokenizer, ex.messages)
                if len(ex.prompt_ids) > max_prompt_tokens:
                    self.dropped_long += 1
                else:
                    self.examples.append(ex)
        if self.dropped_long:
            log.warning("dropped %d prompts longer than %d tokens", self.dropped_long, max_prompt_tokens)
        if not self.examples:
            raise DataError(f"no usable prompts in {', '.join(map(str, files))}")
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.examples)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Example]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.examples):
            raise DataError(
                f"data position was saved for {state.get('size')} prompts, these files hold {len(self.examples)}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
