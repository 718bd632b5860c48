"""Mistakes in what a user gave (a config key, a data row, a reward function, a model id), found
before or while a run goes. The CLI prints each as one line, `<kind>: <what, where, the fix>`, and
exits 2: the same line from `train` and `eval` for the same mistake, no traceback per rank (a
run's traceback goes to RUN_DIR/logs/). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user fixes; the message names the file, row or key and the fix."""

    kind = "error"  # the line's prefix
    keep_traceback = True  # found while running: the traceback goes to a file the line names
