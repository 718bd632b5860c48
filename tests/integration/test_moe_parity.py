"""One REAL update of a tiny MoE model (tools/parity_step.py --hf) agrees with one process under
expert, tensor, pipeline and data parallelism; the load-balancing loss's gradient too; checkpoints
reshard across EP sizes.

With --adam-eps 1 and no clipping the update is ~ lr * grad, so parameters compare gradients,
their scale included. The model is a Qwen2-MoE (shared expert with its sigmoid gate, QKV bias).
"""

import re

import pytest
from moe_models import make_moe_checkpoint
from test_actor_parity import max_rel_diff, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SENSITIVE = ["--adam-eps", "1", "--lr", "0.1", "--clip-grad", "0"]
NO_AUX = ["--moe-aux-loss-coef", "0"]
AUX = ["--moe-aux-loss-coef", "1"]


def test_moe_update_agrees_across_expert_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    """The load-balancing loss is in (coefficient 1, large enough to move the parameters by
    percents), so its gradient is held to the same 1e-6 as the policy loss's; micro-batches are
    fixed (2) because the aux loss is per micro-batch."""
    hf = str(make_moe_checkpoint(tmp_path / "hf", "qwen2_moe"))
    base = ["--hf", hf] + SENSITIVE + ["--micro-batches", "2"]
    reference, log = run(tmp_path, "reference", 1, base + AUX)
    without_aux, _ = run(tmp_path, "no-aux", 1, base + NO_AUX)
    assert max_rel_diff(reference, without_aux) > 1e-2  # the aux loss's gradient matters
    layouts = {  # the default data path: packed rows, fused output layer
        # EP=2 on 2 ranks is DP=2 for everything outside the experts
        "ep2-dp2-allgather": ["--ep", "2", "--dispatcher", "allgather"],
        "ep2-tp2-sp-alltoall": ["--ep", "2", "--etp", "1", "--tp", "2", "--sequence-parallel"],
        "pp2": ["--pp", "2"],
    }
    aux_of = lambda out: float(re.search(r"moe_aux_loss (\S+)", out).group(1))  # noqa: E731
    # fp32 rounding: TP=2 halves the heads each attention call sees, and the attention kernel
    # (scaled_dot_product_attention) then blocks its reductions differently (measured 1.13e-6 there)
    tolerance = {"ep2-tp2-sp-alltoall": 2e-6}
    for name, args in layouts.items():
        params, out = run(tmp_path, name, 2, base + AUX + args)
        assert max_rel_diff(reference, params) <= tolerance.get(name, 1e-6), name
        assert aux_of(out) == pytest.approx(aux_of(log), rel=1e-6), name  # the step's statistic: padding left out
    assert any(".mlp.experts.3.down_proj" in k for k in reference) and any("shared_expert_gate" in k for k in reference)
    # micro-batches by a token budget (their number then varies with the layout): the policy loss alone
    params, _ = run(tmp_path, "ep2-budget", 2, ["--hf", hf] + SENSITIVE + NO_AUX + ["--ep", "2", "--max-tokens", "70"])
    assert max_rel_diff(without_aux, params) <= 1e-6


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
        resumed, _ = run(
            tmp_path,
            f"resumed-ep{load_procs}",
            load_procs,
            base + layout[load_procs] + ["--steps", "1", "--load", ckpt],
        )
        assert max_rel_diff(straight, resumed) <= 1e-6, f"EP={save_procs} -> EP={load_procs}"
