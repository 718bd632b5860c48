"""Progress off a terminal: whole lines at most every interval and one at the end, never '\\r'."""

import io

from real_megatron.progress import LineProgress, progress


def test_lines_at_the_interval_and_at_the_end():
    out = io.StringIO()
    bar = progress(total=5, desc="real RL", unit="step", interval_s=3600, stream=out)
    assert isinstance(bar, LineProgress)  # a StringIO is not a terminal
    for _ in range(5):
        bar.update(1)
        bar.set_postfix(reward="0.500")
    assert out.getvalue() == ""  # nothing before the interval...
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("real RL: 5/5 step (") and "reward=0.500" in lines[0]
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # ...and the end only once


def test_every_update_past_the_interval_and_iteration():
    out = io.StringIO()
    items = list(progress(range(3), desc="warm-start", interval_s=0.0, stream=out))
    assert items == [0, 1, 2]
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "warm-start: 1/3 it",
        "warm-start: 2/3 it",
        "warm-start: 3/3 it",
    ]
    assert "\r" not in out.getvalue()
