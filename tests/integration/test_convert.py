"""HF <-> Megatron conversion through the CLI, as users run it: exact round trips, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_logits_parity import make_checkpoint

from real_megatron.convert.export import iter_buckets

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CLI = [sys.executable, "-m", "real_megatron.cli", "convert"]


def cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def hf_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["1 + 2 = 3", "\\boxed{42} is the answer"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    )
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.mark.parametrize(
    "family,layout,dtype",
    [
        ("qwen2_tied", ["--tp", 2], torch.float32),
        ("llama3_scaled", ["--tp", 2], torch.float32),
        ("qwen3_qknorm", ["--tp", 2], torch.bfloat16),
        ("qwen2_tied", ["--pp", 2], torch.float32),
        ("llama3_scaled", ["--tp", 1], torch.bfloat16),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, family, layout, dtype):
    src = tmp_path / "hf"
    make_checkpoint(src, family, dtype)
    make_tokenizer(src)
    out = cli("hf-to-megatron", "--hf", src, "--out", tmp_path / "mcore", *layout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "mcore.tmp").exists() and (tmp_path / "mcore" / "hf" / "tokenizer.json").exists()
    out = cli("megatron-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "back")  # loads at tp=1 pp=1
    assert out.returncode == 0, out.stderr[-3000:]
    original, back = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()


def test_export_from_tensor_parallel_shards_with_sharded_files_loads_in_transformers(tmp_path):
    import transformers

    src = tmp_path / "hf"
    make_checkpoint(src, "llama3_scaled")
    assert cli("hf-to-megatron", "--hf", src, "--out", tmp_path / "mcore").returncode == 0
    # the streaming export under TP=2 (gathering shards per tensor), into ~100 kB shards
    out = cli(
        "megatron-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "back", "--tp", 2, "--max-shard-gb", 1e-4
    )
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((tmp_path / "back" / f).exists() for f in files)
    original = hf_tensors(src)
    assert all(torch.equal(hf_tensors(tmp_path / "back")[k], v) for k, v in original.items())
    a = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 301, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_clear_errors(tmp_path):
    src = tmp_path / "hf"
    make_checkpoint(src, "qwen2_tied")
    config = json.loads((src / "config.json").read_text())

    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(
        json.dumps(dict(config, model_type="mixtral", architectures=["MixtralForCausalLM"]))
    )
    out = cli("hf-to-megatron", "--hf", moe, "--out", tmp_path / "x")
    assert (
        out.returncode == 2
        and "unsupported architecture ['MixtralForCausalLM']" in out.stderr
        and "qwen2, llama, qwen3" in out.stderr
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    out = cli("hf-to-megatron", "--hf", broken, "--out", tmp_path / "x")
    assert out.returncode == 2 and "model.layers.1.mlp.up_proj.weight" in out.stderr

    assert cli("hf-to-megatron", "--hf", src, "--out", tmp_path / "mcore").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(config, hidden_size=128, intermediate_size=256)))
    out = cli("megatron-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "y", "--hf-config", other)
    assert out.returncode == 2 and "a checkpoint of another model?" in out.stderr


def test_buckets_keep_order_and_size():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 5, 100, 1, 1])]
    buckets = list(iter_buckets(tensors, bucket_bytes=30 * 4))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    with pytest.raises(ValueError):
        list(iter_buckets(tensors, 0))


def test_trainer_starts_from_a_converted_checkpoint_in_another_layout(tmp_path):
    """HF -> megatron at TP=2, then the actor loads it at PP=2: the same weights as from the HF file."""
    tool = Path(__file__).resolve().parents[2] / "tools" / "parity_step.py"

    def run(*a):
        return subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True, timeout=600, cwd=tmp_path)

    out = run(tool, "--steps", 0, "--out", tmp_path / "seed.safetensors", "--write-hf", tmp_path / "hf")
    assert out.returncode == 0, out.stderr[-3000:]
    assert cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", tmp_path / "mcore", "--tp", 2).returncode == 0
    out = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        tool,
        "--pp",
        2,
        "--steps",
        0,
        "--init-from",
        tmp_path / "mcore",
        "--out",
        tmp_path / "loaded.safetensors",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seed, loaded = load_file(tmp_path / "seed.safetensors"), load_file(tmp_path / "loaded.safetensors")
    assert set(seed) == set(loaded) and all(torch.equal(seed[k], loaded[k]) for k in seed)
