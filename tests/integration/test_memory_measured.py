"""The memory estimate (real_megatron/memory.py) against the actor's real peak on CPU.

One process runs a real actor step (old log-probs + one update, world size 1) for several shapes
through tools/bench_actor.py's worker, the peak of its forward/backward passes taken from torch's
allocator (every allocation and free, recorded by the profiler; the optimizer's step left out) and
compared with the estimate's activation and output-layer terms for the micro-batches it ran. The
band on these shapes (docs/actor.md, memory.py): within 10% without recompute; with recompute
above the measurement, at most 1.7x (conservative by construction); at the real vocabulary (151,936)
at most 10% below and 1.5x above (measured: 1.39x above)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]

SHAPES = {
    "packed+fused": [],
    "packed+fused, 4 layers": ["--layers", "4"],
    "packed+fused, full recompute": ["--recompute"],
    "padded+naive": ["--padded", "--naive", "--groups-per-micro", "2"],
    "packed+fused, two 1.6k-token rollouts": ["--response-tokens", "1500", "--groups", "1", "--group-size", "2"],
    "packed+fused, vocabulary 151,936": ["--vocab", "151936"],
}
BASE = ["--hidden", "128", "--layers", "2", "--vocab", "4096", "--groups", "2", "--group-size", "4"]
BASE += ["--max-tokens", "4096", "--allocator-peak", "--threads", "2"]

RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_actor
shapes, base = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {name: bench_actor.worker(bench_actor.parse_args(base + extra)) for name, extra in shapes.items()}
print("RESULT " + json.dumps(out))
"""


def test_the_estimate_holds_against_the_allocators_peak_for_several_shapes():
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(ROOT / "tools"), json.dumps(SHAPES), json.dumps(BASE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name, r in results.items():
        ratio = r["compute_peak_gb"] / r["estimate_gb"]
        # at the real vocabulary the estimate's second logit tile is a whole 2^25-element tile: above
        band = (1 / 1.7, 1.0) if "recompute" in name else (1 / 1.5, 1.1) if "vocabulary" in name else (0.9, 1.1)
        assert band[0] <= ratio <= band[1], (name, ratio, r)
    # the shapes differ by more than the band: the estimate tells them apart
    peaks = sorted(r["compute_peak_gb"] for r in results.values())
    assert peaks[-1] > 3 * peaks[0]
