"""Hugging Face Hub ids as model.path / eval --model (hub.py), offline: what reads as an id, the
one-line error when it cannot be had (HF_HUB_OFFLINE=1, nothing cached), and an id resolved from a
Hugging Face cache laid out on disk as huggingface_hub leaves it (no network)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron.hub import hub_config_json, is_hub_id, resolve_model

ROOT = Path(__file__).resolve().parents[2]
EXE = shutil.which("real-megatron", path=str(Path(sys.executable).parent))
PAPER = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN = {  # the 1.5B's architecture, so the paper config's split checks pass
    "model_type": "qwen2",
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def hf_cache(home: Path, repo: str, files: dict) -> Path:
    """HF_HOME with `repo` cached as snapshot_download leaves it: refs/main -> snapshots/<commit>/."""
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def offline_env(home: Path) -> dict:
    return dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home / "hub"))


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    for hub in ("Qwen/Qwen2.5-7B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "a/b", "org_1/m.v2"):
        assert is_hub_id(hub), hub
    nonsense = ["", "model", "/abs/org/name", "./org/name", "checkpoints/hf/Qwen3-30B-A3B", "org/na me", "org/-x"]
    nonsense += ["org/x-", "org/a..b", "org/a--b", "~/org", "org/", "/org", "org/name/"]
    for value in nonsense:
        assert not is_hub_id(value), value
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert not is_hub_id("models/mine")  # a directory here is a path, whatever its shape
    assert resolve_model("models/mine") == "models/mine" and resolve_model("checkpoints/x/y") == "checkpoints/x/y"


def test_offline_and_not_cached_is_one_line_naming_the_id_and_the_fix(tmp_path):
    """Before any process group or torch: `train` says it in one line, exit 2."""
    out = subprocess.run(
        [EXE, "train", str(PAPER), "model.path=nobody/no-such-model"],
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(tmp_path / "hf"),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        "model error: model.path nobody/no-such-model: no such directory here; as a Hugging Face Hub id"
    )
    assert "HF_HUB_OFFLINE=1" in line and "huggingface-cli download nobody/no-such-model" in line
    assert "give a local checkpoint directory" in line


def test_a_hub_id_resolves_from_the_cache_and_the_dry_run_reads_only_its_config(tmp_path, monkeypatch):
    from huggingface_hub import constants

    home = tmp_path / "hf"
    snapshot = hf_cache(home, "org/tiny-qwen", {"config.json": json.dumps(QWEN), "tokenizer.json": "{}"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny-qwen") == str(snapshot)
    assert hub_config_json("org/tiny-qwen", fetch=False) == (
        snapshot / "config.json",
        "org/tiny-qwen's config.json in the Hugging Face cache",
    )
    assert hub_config_json("org/absent", fetch=False)[0] is None
    # the dry run: the architecture from the cached config.json, nothing missing, no download
    out = subprocess.run(
        [EXE, "train", str(PAPER), "--dry-run", "model.path=org/tiny-qwen", "model.hf_config_overrides=null"],
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(home),
        cwd=tmp_path,
    )
    assert "# architecture: from org/tiny-qwen's config.json in the Hugging Face cache" in out.stdout, out.stderr
    assert "model.path" not in out.stdout.split("# inputs:")[1].splitlines()[0]
    # not cached, offline: the dry run says it cannot read the architecture, and goes on
    out = subprocess.run(
        [EXE, "train", str(PAPER), "--dry-run", "model.path=org/elsewhere"],
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(home),
        cwd=tmp_path,
    )
    assert "model.path org/elsewhere is read as a Hugging Face Hub id; its architecture is unknown here" in out.stderr


@pytest.mark.parametrize("what", ["model.path", "--model"])
def test_the_error_names_what_gave_the_id(tmp_path, monkeypatch, what):
    from huggingface_hub import constants

    from real_megatron.hub import ModelSourceError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match=f"^{what} org/gone: no such directory here"):
        resolve_model("org/gone", what)
