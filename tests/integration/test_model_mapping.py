"""Architecture facts from HF configs and the exact HF <-> megatron tensor layouts (no process group)."""

import pytest
import torch

from real_megatron.actor.distributed import launch_env
from real_megatron.actor.model import ArchSpec, UnsupportedModelError, rope_inv_freq
from real_megatron.actor.weights import init_hf_state_dict
from real_megatron.hf_mapping import _LAYER_RULES, _MODEL_RULES, expected_hf_names, hf_from_shards, shard_from_hf

QWEN2 = dict(
    model_type="qwen2",
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def test_arch_spec_reads_families_and_rejects_others():
    spec = ArchSpec.from_hf(QWEN2)
    assert (spec.qkv_bias, spec.qk_norm, spec.head_dim, spec.tie_word_embeddings) == (True, False, 8, True)
    qwen3 = ArchSpec.from_hf(dict(QWEN2, model_type="qwen3", head_dim=16))
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 16)
    with pytest.raises(
        UnsupportedModelError, match=r"unsupported architecture \['MixtralForCausalLM'\].*qwen2, llama, qwen3"
    ):
        ArchSpec.from_hf(dict(QWEN2, model_type="mixtral", architectures=["MixtralForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn' is not supported"):
        ArchSpec.from_hf(dict(QWEN2, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp=4"):
        spec.check_parallel(4, 1)


def test_llama3_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_theta=500000.0,
        max_position_embeddings=1024,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    expect, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.equal(rope_inv_freq(ArchSpec.from_hf(cfg)), expect)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_layout_round_trips_exactly(tp):
    spec = ArchSpec.from_hf(dict(QWEN2, num_attention_heads=8, num_key_value_heads=4))
    hf = init_hf_state_dict(spec, seed=3, bias_std=0.1)
    rules = {**_LAYER_RULES, **_MODEL_RULES}
    for name, rule in rules.items():
        if "layer_norm_weight" in name:
            continue  # TE's fused-norm alias of the same tensor
        if name == "output_layer.weight":
            names = ["model.embed_tokens.weight"]  # tied in this config
        else:
            names = [h.format(i=1) for h in rule.hf]
        if any(n not in hf for n in names):
            continue
        shards = [shard_from_hf(rule, [hf[n] for n in names], spec, tp, r) for r in range(tp)]
        assert len({s.shape for s in shards}) == 1
        for n, back in zip(names, hf_from_shards(rule, shards, spec)):
            assert torch.equal(back, hf[n]), (name, n)


def test_qkv_layout_is_per_query_group():
    spec = ArchSpec.from_hf(dict(QWEN2, hidden_size=8, num_attention_heads=4, num_key_value_heads=2))  # hd=2
    q = torch.arange(8.0)[:, None].expand(8, 8)  # rows 0..7: 4 heads x hd 2
    k = 100 + torch.arange(4.0)[:, None].expand(4, 8)
    v = 200 + torch.arange(4.0)[:, None].expand(4, 8)
    rule = _LAYER_RULES["self_attention.linear_qkv.weight"]
    full = shard_from_hf(rule, [q, k, v], spec, 1, 0)[:, 0].tolist()
    # group 0: q heads 0,1 (rows 0-3), k head 0, v head 0; then group 1
    assert full == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert shard_from_hf(rule, [q, k, v], spec, 2, 1)[:, 0].tolist() == full[8:]


def test_vocab_padding_is_stripped_on_the_way_back():
    spec = ArchSpec.from_hf(QWEN2)  # vocab 101
    table = torch.randn(101, 32)
    rule = _MODEL_RULES["embedding.word_embeddings.weight"]
    shards = [shard_from_hf(rule, [table], spec, 4, r) for r in range(4)]
    assert shards[0].shape == (26, 32) and (shards[3][-3:] == 0).all()
    assert torch.equal(hf_from_shards(rule, shards, spec)[0], table)


def test_expected_names_cover_a_checkpoint():
    spec = ArchSpec.from_hf(dict(QWEN2, tie_word_embeddings=False))
    names = expected_hf_names(spec)
    assert "lm_head.weight" in names and "model.layers.1.self_attn.k_proj.bias" in names
    assert len(names) == len(set(names)) == 3 + 2 * 12


def test_launch_env_from_torchrun_and_slurm():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3,
        8,
        1,
        "n1",
        1234,
        "torchrun",
    )
    env = launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 16, 1, "gpu07", "slurm")
    assert env.master_port == 20000 + 4242
    alone = launch_env({})
    assert alone.source == "single" and alone.world_size == 1 and alone.master_port > 0
