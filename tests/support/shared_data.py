"""Where the real benchmark files are: ../shared/data beside the checkout, or $REAL_MEGATRON_DATA."""

import os
from pathlib import Path

DATA = Path(os.environ.get("REAL_MEGATRON_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
BENCHMARKS = ["aime", "amc", "math", "minerva", "olympiad_bench"]


def data_file(name: str) -> Path:
    path = DATA / f"{name}.parquet"
    assert path.exists(), (
        f"{path} is missing: the tests read the real files in ../shared/data (or set REAL_MEGATRON_DATA)"
    )
    return path
