"""One REAL update of a tiny MoE model (tools/parity_step.py --hf) agrees with one process under
expert, tensor, pipeline and data parallelism; the load-balancing loss's gradient too; checkpoints
reshard across EP sizes.

With --adam-eps 1 and no clipping the update is ~ lr * grad, so parameters compare gradients,
their scale included. The model is a Qwen2-MoE (shared expert with its sigmoid gate, QKV bias).
"""

import pytest

from support.moe_models import make_moe_checkpoint
from test_actor_parity import max_rel_diff, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SENSITIVE = ["--adam-eps", "1", "--lr", "0.1", "--clip-grad", "0"]
NO_AUX = ["--moe-aux-loss-coef", "0"]


def test_moe_update_agrees_across_expert_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    hf = str(make_moe_checkpoint(tmp_path / "hf", "qwen2_moe"))
    base = ["--hf", hf] + SENSITIVE
    reference, log = run(tmp_path, "reference", 1, base + NO_AUX)
    layouts = {  # the default data path: packed rows, fused output layer
        # EP=2 on 2 ranks is DP=2 for everything outside the experts
        "ep2-dp2-allgather-budget": ["--ep", "2", "--dispatcher", "allgather", "--max-tokens", "70"],
        "ep2-tp2-sp-alltoall": ["--ep", "2", "--etp", "1", "--tp", "2", "--sequence-parallel"],
        "pp2": ["--pp", "2"],
    }
    for name, args in layouts.items():
        params, out = run(tmp_path, name, 2, base + NO_AUX + args)
        assert max_rel_diff(reference, params) <= 1e-6, name
        assert "moe_aux_loss" in out and "moe_expert_load_max" in out
    assert any(".mlp.experts.3.down_proj" in k for k in reference) and any("shared_expert_gate" in k for k in reference)

    # the load-balancing loss (coefficient 1: large enough to see) moves the parameters, and its
    # gradient agrees where the per-micro-batch token set is the same as one process's (PP=2)
    with_aux, _ = run(tmp_path, "aux", 1, base + ["--moe-aux-loss-coef", "1"])
    assert max_rel_diff(reference, with_aux) > 1e-2
    pp_aux, _ = run(tmp_path, "aux-pp2", 2, base + ["--moe-aux-loss-coef", "1", "--pp", "2"])
    assert max_rel_diff(with_aux, pp_aux) <= 1e-6


def test_checkpoints_reshard_across_expert_parallel_sizes(tmp_path):
    """Model and distributed optimizer (megatron chains a dense and an expert optimizer): a
    checkpoint written at EP=2 resumes at EP=1 and the reverse; one process runs both steps."""
    hf = str(make_moe_checkpoint(tmp_path / "hf", "qwen3_moe"))
    base = ["--hf", hf] + SENSITIVE + NO_AUX
    straight, _ = run(tmp_path, "straight", 1, base + ["--steps", "2"])
    for save_procs, load_procs in ((2, 1), (1, 2)):
        ckpt = str(tmp_path / f"ckpt-ep{save_procs}")
        layout = {1: [], 2: ["--ep", "2"]}
        run(tmp_path, f"first-ep{save_procs}", save_procs, base + layout[save_procs] + ["--steps", "1", "--save", ckpt])
        resumed, _ = run(tmp_path, f"resumed-ep{load_procs}", load_procs, base + layout[load_procs] + ["--steps", "1", "--load", ckpt])
        assert max_rel_diff(straight, resumed) <= 1e-6, f"EP={save_procs} -> EP={load_procs}"
