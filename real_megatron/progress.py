"""Progress for people: a tqdm bar on a terminal, a plain line every few seconds anywhere else.

Slurm logs and pipes are not terminals; there a bar's carriage-return frames pile up into one
endless line. `progress()` then prints `desc: n/total unit (rate, postfix)` lines instead, at most
one per `interval_s` and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Optional


def progress(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
    interval_s: float = 10.0,
    stream=None,
):
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, initial=initial, interval_s=interval_s, stream=stream
    )


def quiet_library_bars(stream=None) -> None:
    """Off a terminal, libraries' own bars (transformers' "Writing model shards") go quiet too."""
    if not (stream or sys.stderr).isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class LineProgress:
    """tqdm's update / set_postfix / close, printed as whole lines."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, interval_s=10.0, stream=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.interval_s, self.stream = interval_s, stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.printed_n, self.postfix = None, ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.printed_n != self.n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last, self.printed_n = now, self.n
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        extra = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {done} {self.unit} ({rate:.3g} {self.unit}/s, {now - self.start:.0f} s{extra})",
            file=self.stream,
            flush=True,
        )
