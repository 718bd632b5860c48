"""The paper's ablations (Table 4) as overlays of the Table 1 config, each checked by --dry-run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"
EXE = shutil.which("real-megatron", path=str(Path(sys.executable).parent))
# Table 4's rows: the config, and the keys in which it differs from Table 1's (train.output_dir aside)
TABLE4 = {
    "ablation_bce_r1distill_qwen_1p5b.yaml": {("algorithm", "name"): "real_bce"},
    "ablation_no_anchor_r1distill_qwen_1p5b.yaml": {("algorithm", "name"): "real_no_anchor"},
    "ablation_tau0p1_r1distill_qwen_1p5b.yaml": {("algorithm", "tau"): 0.1},
    "ablation_tau1_r1distill_qwen_1p5b.yaml": {("algorithm", "tau"): 1.0},
    "ablation_kl_reference_r1distill_qwen_1p5b.yaml": {("algorithm", "kl"): "reference",
                                                       ("algorithm", "kl_coef"): 0.001},
    "ablation_kl_old_r1distill_qwen_1p5b.yaml": {("algorithm", "kl"): "old", ("algorithm", "kl_coef"): 0.001},
}


def leaves(tree: dict, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "hf_config_overrides":
            out.update(leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_table4_row_differs_from_table1_in_its_keys_only_and_dry_runs(name):
    path = ROOT / "configs" / name
    base, row = leaves(config_to_dict(load_config(BASE))), leaves(config_to_dict(load_config(path)))
    changed = {k: v for k, v in row.items() if base[k] != v and k != ("train", "output_dir")}
    assert changed == TABLE4[name]
    assert row[("train", "output_dir")] == f"runs/{path.stem}"
    out = subprocess.run([EXE, "train", str(path), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("config OK"), out.stderr
    has_reference = "reference model (kl)" in out.stdout
    assert has_reference == (TABLE4[name].get(("algorithm", "kl")) == "reference"), out.stdout[-1500:]
