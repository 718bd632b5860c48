"""Qwen3-MoE and Qwen2-MoE on megatron-core: transformers' logits under EP/ETP/TP and both
dispatchers, bit-identical conversion round trips across expert layouts, unmapped configs refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_models import make_moe_checkpoint
from test_convert import cli, hf_tensors, make_tokenizer

from real_megatron.actor.model import ArchSpec
from real_megatron.actor.moe import UnsupportedMoEError

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _hf_config(family: str, **overrides) -> dict:
    import transformers
    from moe_models import COMMON, FAMILIES

    config_cls, _, extra = FAMILIES[family]
    return getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides}).to_dict()


def test_layer_pattern_and_router_settings_follow_the_hf_config():
    spec = ArchSpec.from_hf(_hf_config("qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert spec.moe.layer_pattern == (0, 1, 0, 0, 0, 1) and spec.qkv_bias and not spec.qk_norm
    assert spec.moe.shared_expert_intermediate_size == 48 and not spec.moe.norm_topk_prob
    qwen3 = ArchSpec.from_hf(_hf_config("qwen3_moe"))
    assert qwen3.moe.norm_topk_prob and qwen3.qk_norm and qwen3.moe.shared_expert_intermediate_size is None
    assert qwen3.moe.num_experts == 4 and qwen3.moe.top_k == 2 and qwen3.moe.router_aux_loss_coef == 0.01


@pytest.mark.parametrize(
    "family,key,value",
    [
        ("qwen3_moe", "shared_expert_intermediate_size", 48),  # Qwen3-MoE has no shared expert
        ("qwen3_moe", "scoring_func", "sigmoid"),  # another router scoring
        ("qwen2_moe", "n_group", 4),  # group-limited routing
        ("qwen2_moe", "mlp_only_layers", [7]),  # not a layer
        ("qwen3_moe", "routed_scaling_factor", 2.5),
    ],
)
def test_unmapped_moe_features_are_refused_by_name(family, key, value):
    with pytest.raises(UnsupportedMoEError, match=key):
        ArchSpec.from_hf({**_hf_config(family), key: value}, "cfg.json")


def test_experts_in_a_dense_family_and_bad_expert_layouts_are_refused():
    from real_megatron.actor.model import UnsupportedModelError, transformer_config

    dense = {
        "model_type": "qwen2",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_experts": 4,
    }
    with pytest.raises(UnsupportedModelError, match="num_experts"):
        ArchSpec.from_hf(dense)
    spec = ArchSpec.from_hf(_hf_config("qwen3_moe"))
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by ep=3"):
        transformer_config(spec, ep=3)
    with pytest.raises(ValueError, match="moe_intermediate_size=32 is not divisible by etp=3"):
        transformer_config(spec, etp=3)
    dense.pop("num_experts")
    with pytest.raises(ValueError, match="expert parallelism needs a mixture-of-experts model"):
        transformer_config(ArchSpec.from_hf(dense), ep=2)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "family,layout",
    [
        pytest.param("qwen3_moe", ["--tp", 2, "--ep", 2, "--etp", 1], id="qwen3_moe-tp2-ep2-alltoall"),
        pytest.param("qwen2_moe", ["--ep", 2, "--dispatcher", "allgather"], id="qwen2_moe-ep2-allgather"),
        pytest.param("qwen2_moe", ["--tp", 2], id="qwen2_moe-tp2-etp2"),  # experts split over expert-TP = TP
    ],
)
def test_logits_match_transformers(tmp_path, family, layout):
    # 3 layers with a dense one in the middle: the sparse/dense pattern is honoured
    make_moe_checkpoint(tmp_path / family, family, num_hidden_layers=3, mlp_only_layers=[1])
    proc = subprocess.run(
        TORCHRUN
        + [
            str(ROOT / "tools" / "check_parity.py"),
            "--hf",
            str(tmp_path / family),
            "--tolerance",
            "1e-5",
            *map(str, layout),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if "max |delta logit|" in l][0]
    assert float(line.split("= ")[1].split()[0]) <= 1e-5 and "OK" in line


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "family,dtype,save_layout,load_layout",
    [
        ("qwen2_moe", torch.float32, ["--ep", 2], []),  # EP=2 checkpoint exported at EP=1
        (
            "qwen3_moe",
            torch.bfloat16,
            [],
            ["--tp", 2, "--ep", 2, "--etp", 1],
        ),  # EP=1 checkpoint exported at TP=2 x EP=2
    ],
)
def test_round_trip_across_expert_layouts_is_bit_identical(tmp_path, family, dtype, save_layout, load_layout):
    src = make_moe_checkpoint(tmp_path / "hf", family, dtype=dtype, num_hidden_layers=3, mlp_only_layers=[1])
    make_tokenizer(src)
    out = cli("hf-to-megatron", "--hf", src, "--out", tmp_path / "mcore", *save_layout)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((tmp_path / "mcore" / "convert_info.json").read_text())
    assert info["ep"] == (2 if "--ep" in save_layout else 1)
    out = cli("megatron-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "back", *load_layout)
    assert out.returncode == 0, out.stderr[-3000:]
    original, back = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(original) == set(back) and any(".experts.3." in n for n in back)
    for name in original:
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.ep=3", "parallel.gpus_per_node=3"], "num_experts=4 is not divisible by ep=3"),
        (["parallel.ep=4"], "not divisible by parallel.ep x etp x pp"),
        (["parallel.tp=2"], "needs parallel.sequence_parallel: true"),
    ],
)
def test_expert_layouts_are_checked_at_load(overrides, message):
    from real_megatron.config import ConfigError, load_config

    load_config(ROOT / "configs" / "quickstart_moe.yaml")  # EP=2 over two processes: valid
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "quickstart_moe.yaml", overrides)


def test_dense_models_refuse_expert_settings():
    from real_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.ep"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["parallel.ep=2", "parallel.gpus_per_node=2"])


def test_moe_layers_get_the_micro_batch_aux_loss_router():
    """Both spec shapes (megatron-core 0.16's ModuleSpec, 0.19's functools.partial) take the router
    whose aux loss spans the whole micro-batch (its gradient is layout-independent)."""
    from real_megatron.actor.model import layer_spec
    from real_megatron.actor.moe_router import MicroBatchAuxLossRouter

    mlp = layer_spec(ArchSpec.from_hf(_hf_config("qwen2_moe")), torch.float32, num_experts=4).submodules.mlp
    submodules = getattr(mlp, "submodules", None) or mlp.keywords["submodules"]
    assert submodules.router is MicroBatchAuxLossRouter
