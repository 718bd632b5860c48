"""Checkpoint directory bookkeeping: only complete checkpoints count; keep-last-N deletes the oldest."""

import json

from real_megatron.actor.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint, prune_checkpoints


def make(root, step, complete=True):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    if complete:
        (d / STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_ignores_incomplete_and_temporary(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    make(tmp_path, 10)
    make(tmp_path, 100)
    make(tmp_path, 200, complete=False)  # crashed mid-save: no state file
    (tmp_path / "step_000300.tmp").mkdir()
    (tmp_path / "notes").mkdir()
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_000010", "step_000100"]
    assert latest_checkpoint(tmp_path).name == "step_000100"


def test_keep_last_n(tmp_path):
    for step in (5, 10, 15, 20):
        make(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_000015", "step_000020"]
    prune_checkpoints(tmp_path, keep_last=0)  # 0 = keep everything
    assert len(checkpoint_dirs(tmp_path)) == 2
