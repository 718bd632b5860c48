"""Megatron model built from an HF checkpoint gives transformers' logits (TP=1 and TP=2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAMILIES = {
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_scaled": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
}


def make_checkpoint(path, family, dtype=torch.float32):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=301,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).to(dtype).save_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(tmp_path, family, tp):
    make_checkpoint(tmp_path / family, family)
    launcher = (
        [sys.executable]
        if tp == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    )
    proc = subprocess.run(
        launcher + [str(ROOT / "tools" / "check_parity.py"), "--hf", str(tmp_path / family), "--tp", str(tp)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if "max |delta logit|" in l][0]
    assert float(line.split("= ")[1].split()[0]) <= 1e-4 and "OK" in line
