"""logging.wandb and logging.mlflow: the step metrics really land in each tracker's own files,
offline (W&B's offline mode, MLflow's file store). Both packages are optional: a test skips, with
the reason, where its package is not installed."""

import json

import pytest

from real_megatron.metrics import MetricsLogger

CONFIG = {"algorithm": {"name": "real", "tau": 0.5}, "train": {"steps": 2}}


def _log_two_steps(run_dir, **trackers):
    logger = MetricsLogger(run_dir, tensorboard=False, config=CONFIG, **trackers)
    logger.log(1, {"reward_mean": 0.25, "entropy": 1.5})
    logger.log(2, {"reward_mean": 0.5, "entropy": 1.25, "not_finite": float("nan")})
    logger.close()


def _wandb_records(data: bytes):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header, 32 KiB blocks,
    each record a 7-byte header of checksum, length and kind: full, first, middle, last)."""
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _wandb_history(path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _wandb_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_step_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_two_steps(tmp_path / "run", wandb=True)
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    steps = {row["_step"]: row for row in history}
    assert steps[1]["reward_mean"] == 0.25 and steps[2]["entropy"] == 1.25
    assert "not_finite" not in steps[2]
    assert run_file.name == f"run-{(tmp_path / 'run' / 'wandb_run_id').read_text().strip()}.wandb"


def test_mlflow_file_store_holds_the_step_metrics_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is optional (pip install mlflow-skinny)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    _log_two_steps(run_dir, mlflow=True)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    (run_path,) = (run_dir / "mlruns").glob(f"*/{run_id}")
    rows = [line.split() for line in (run_path / "metrics" / "reward_mean").read_text().splitlines()]
    assert [(float(value), int(step)) for _, value, step in rows] == [(0.25, 1), (0.5, 2)]
    assert (run_path / "params" / "algorithm.tau").read_text() == "0.5"
    logger = MetricsLogger(run_dir, tensorboard=False, mlflow=True, config=CONFIG, resume_step=2)
    logger.log(3, {"reward_mean": 0.75})
    logger.close()
    assert (run_path / "metrics" / "reward_mean").read_text().splitlines()[-1].split()[1:] == ["0.75", "3"]


def test_a_missing_tracker_package_is_named(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"logging.wandb: true needs the wandb package .*pip install wandb"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)
