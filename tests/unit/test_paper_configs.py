"""The paper's ablations (Table 4) as overlays of the Table 1 config, each checked by --dry-run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"
EXE = shutil.which("real-megatron", path=str(Path(sys.executable).parent))
# Table 4's rows: the config, and the keys in which it differs from Table 1's (train.output_dir aside)
TABLE4 = {
    "ablation_bce_r1distill_qwen_1p5b.yaml": {("algorithm", "name"): "real_bce"},
    "ablation_no_anchor_r1distill_qwen_1p5b.yaml": {("algorithm", "name"): "real_no_anchor"},
    "ablation_tau0p1_r1distill_qwen_1p5b.yaml": {("algorithm", "tau"): 0.1},
    "ablation_tau1_r1distill_qwen_1p5b.yaml": {("algorithm", "tau"): 1.0},
    "ablation_kl_reference_r1distill_qwen_1p5b.yaml": {
        ("algorithm", "kl"): "reference",
        ("algorithm", "kl_coef"): 0.001,
    },
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


def test_long_rollout_config_needs_context_parallelism_to_fit():
    """32k-token responses without recompute: --dry-run's plan fits at cp=2 (16,896 tokens per GPU);
    at cp=1 the budget cannot hold a rollout (the error names a cp that would), and the budget
    that could does not fit the GPU."""
    from real_megatron.config import ConfigError
    from real_megatron.memory import architecture_of, estimate_memory

    path = ROOT / "configs" / "real_r1distill_qwen_7b_32k.yaml"
    out = subprocess.run([EXE, "train", str(path), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("config OK"), out.stderr
    assert "tp=2 pp=1 cp=2 dp=8" in out.stdout and "context-parallel K/V" in out.stdout
    assert "16896 tokens per micro-batch per rank (packed, after the cp=2 split)" in out.stdout
    assert ": fits" in out.stdout
    with pytest.raises(ConfigError, match=r"at least 33792, or split each sequence over parallel.cp=2"):
        load_config(path, ["parallel.cp=1", "parallel.nodes=2"])
    whole = load_config(path, ["parallel.cp=1", "parallel.nodes=2", "actor.max_tokens_per_micro_batch=33792"])
    estimate = estimate_memory(whole, architecture_of(whole), 80.0)
    assert not estimate.fits and estimate.total_gb > 100
    split = load_config(path)
    assert estimate_memory(split, architecture_of(split), 80.0).fits


def test_qwen3_30b_a3b_configs_dry_run_their_moe_plan():
    """Multi-node: parameters in all and active, experts per GPU, the dispatcher's buffers, the
    servers' KV room, and a fit. One node of 8 x 80 GB, colocated: it fits with the optimizer on the
    host, and the dry run shows the host memory per rank and per node."""

    def dry_run(name):
        return subprocess.run(
            [EXE, "train", str(ROOT / "configs" / name), "--dry-run"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = dry_run("real_qwen3_30b_a3b.yaml")
    assert out.returncode == 0 and out.stdout.rstrip().endswith("config OK"), out.stderr
    for line in (
        "parameters: 30.53 B in all, 3.35 B active per token",
        "experts: 16 of 128 per rank (ep=8)",
        "MoE dispatcher buffers",
        "SGLang server GPU: weights 30.5 GB (bf16, tp=2)",
        "per GPU: fits",
    ):
        assert line in out.stdout, out.stdout[-2500:]
    # one node, colocated, the optimizer on the host (figures by hand: tests/unit/test_colocated_plan.py)
    one_node = dry_run("real_qwen3_30b_a3b_1node.yaml")
    assert one_node.returncode == 0 and one_node.stdout.rstrip().endswith("config OK"), one_node.stderr
    for line in (
        "experts: 16 of 128 per rank (ep=8), each cut etp=1 ways",
        "all of it on the host (optim.cpu_offload",
        "host memory per rank: 61.1 GB, the CPU optimizer's",
        "GPUs 0-7 trainer ranks and, colocated on them, 2 SGLang server(s) x tp=4",
        "host memory per node                552.7 GB",
    ):
        assert line in one_node.stdout, one_node.stdout[-2500:]


def test_retool_config_is_the_7b_recipe_with_the_python_tool_on_dapo17k():
    """ReTool-style REAL: the 7B run's keys but the model, the data and the tool environment's;
    the environment its rollouts would make is built from it (the dry run itself: test_cli.py)."""
    from real_megatron.agents.environment import environment_spec, load_environment_factory

    cfg = load_config(ROOT / "configs" / "real_retool_qwen2p5_7b.yaml")
    base = leaves(config_to_dict(load_config(ROOT / "configs" / "real_r1distill_qwen_7b.yaml")))
    changed = {k[:2] for k, v in leaves(config_to_dict(cfg)).items() if base[k] != v}
    assert changed == {
        ("model", "path"),
        ("data", "train_files"),
        ("data", "require_think_close"),
        ("train", "steps"),
        ("train", "output_dir"),
        ("rollout", "tools"),
        ("rollout", "tool_max_calls_per_turn"),
        ("rollout", "tool_max_result_chars"),
    }
    assert cfg.rollout.multi_turn and cfg.rollout.tools == ["python"] and cfg.rollout.max_turns == 8
    env = load_environment_factory(*environment_spec(cfg.rollout))()
    assert [t["function"]["name"] for t in env.tools()] == ["python"] and env.timeout_s == 10.0


def test_configs_generating_ahead_correct_for_it():
    """docs/running.md: one version ahead without a per-token correction drifts after 100-150 steps;
    every shipped config that generates ahead sets what the docs recommend."""
    ahead = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if load_config(p).rollout.max_staleness >= 1]
    assert len(ahead) >= 3  # quickstart_async and the split one-node configs (the colocated ones are synchronous)
    for path in ahead:
        a = load_config(path).algorithm
        assert (a.importance_correction, a.importance_unit) == ("mis", "token"), path.name
