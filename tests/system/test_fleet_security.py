"""The fleet's key, the run directory's modes, where servers listen, and the fleet settings a
config derives (no SGLang server here: tests/system/test_sglang_fleet.py checks the 401s on real ones;
the launch at the end runs a real one when SGLang's environment is installed).
"""

import json
import os
import socket
import stat
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from tiny_run import CPU_SGLANG, QUIET, cli, sglang_env, tiny_run_overrides

from real_megatron.config import load_config
from real_megatron.rollout.engine_setup import (
    apply_trainer_fleet_environment,
    requests_per_server,
    trainer_fleet_environment,
)
from real_megatron.rollout.fleet_auth import KeyFileError, ensure_run_key, fleet_key, read_key_file
from real_megatron.rollout.serve import bind_address
from real_megatron.rollout.sglang_env import default_server_python
from real_megatron.rollout.sglang_fleet import FleetError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "quickstart.yaml"
HAVE_SGLANG = default_server_python() != "python3"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _make_key(run_dir: str) -> str:
    return read_key_file(ensure_run_key(run_dir))


def test_the_run_key_is_made_once_private_and_shared_by_racing_processes(tmp_path):
    run = tmp_path / "run"
    with ProcessPoolExecutor(4) as pool:  # trainer, serve steps and launch may start together
        keys = list(pool.map(_make_key, [str(run)] * 8))
    assert len(set(keys)) == 1 and len(keys[0]) >= 40
    path = run / "fleet_api_key"
    assert mode(path) == 0o600 and path.read_text() == keys[0] + "\n"
    assert [p.name for p in run.iterdir()] == ["fleet_api_key"]  # no temporary file left behind
    assert _make_key(str(run)) == keys[0]  # a requeued job keeps its key


def test_made_keys_never_start_like_a_flag():
    """SGLang turns its --config file into "--api-key VALUE": a key starting with '-' would be read
    as a flag and the server would not start (a url-safe base64 key did, 1 time in 64)."""
    from real_megatron.rollout.fleet_auth import new_key

    keys = [new_key() for _ in range(2000)]
    assert all(len(k) == 64 and all(c in "0123456789abcdef" for c in k) for k in keys)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "content, file_mode, message",
    [
        (None, 0o600, "cannot be read"),
        ("", 0o600, "expected one line with the key"),
        ("two words\n", 0o600, "expected one line with the key"),
        ("secret\n", 0o640, "mode 0640 lets other users read it; chmod 600"),
        ("-Zk3\n", 0o600, "starts with '-', which SGLang's argument parser reads as a flag"),
    ],
)
def test_a_wrong_key_file_is_an_error_naming_it(tmp_path, content, file_mode, message):
    path = tmp_path / "my.key"
    if content is not None:
        path.write_text(content)
        path.chmod(file_mode)
    with pytest.raises(KeyFileError, match=f"fleet key file {path}: .*{message}"):
        read_key_file(path)


def test_a_user_key_file_is_used_as_given_and_never_made(tmp_path):
    key = tmp_path / "given.key"
    cfg = load_config(
        CONFIG, ["rollout.backend=sglang", f"train.output_dir={tmp_path / 'run'}", f"rollout.api_key_file={key}"]
    )
    with pytest.raises(KeyFileError, match=str(key)):
        fleet_key(cfg)
    key.write_text("s3cret\n")
    key.chmod(0o600)
    assert fleet_key(cfg) == ("s3cret", key)
    assert not (tmp_path / "run" / "fleet_api_key").exists()
    local = load_config(CONFIG, [f"train.output_dir={tmp_path / 'run'}"])
    assert fleet_key(local) == (None, None)  # no fleet, no key


@pytest.mark.parametrize("command", ["train", "launch", "serve"])
def test_train_launch_and_serve_stop_at_start_on_a_wrong_key_file(tmp_path, command):
    key = tmp_path / "shared.key"
    key.write_text("k\n")
    key.chmod(0o644)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "real_megatron.cli",
            command,
            str(CONFIG),
            "rollout.backend=sglang",
            f"rollout.api_key_file={key}",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"config error: fleet key file {key}: mode 0644 lets other users read it" in out.stderr


def test_the_request_bound_follows_the_batch_and_the_fleet():
    one_node = load_config(ROOT / "configs" / "real_r1distill_qwen_1p5b_1node.yaml")
    r, t = one_node.rollout, one_node.train
    assert r.max_requests_per_server == 0
    assert requests_per_server(one_node) == -(-t.prompts_per_step * r.n_samples // r.num_servers)
    assert requests_per_server(one_node) * r.num_servers >= t.prompts_per_step * r.n_samples  # the whole batch
    assert requests_per_server(load_config(CONFIG, ["rollout.backend=sglang", "rollout.num_servers=3"])) == 86  # 32x8/3
    fixed = load_config(CONFIG, ["rollout.backend=sglang", "rollout.max_requests_per_server=7"])
    assert requests_per_server(fixed) == 7
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "real_megatron.cli",
            "train",
            str(CONFIG),
            "--dry-run",
            "rollout.backend=sglang",
            "rollout.num_servers=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "# fleet: 2 SGLang server(s), up to 128 requests in flight each (ceil(32 prompts x 8 samples / 2 server(s)))"
    ) in out.stdout


def test_the_trainer_agrees_with_sglang_on_nccl_cumem_for_the_weight_group(tmp_path):
    distributed = load_config(CONFIG, ["rollout.backend=sglang", "rollout.weight_sync=distributed"])
    assert trainer_fleet_environment(distributed) == {"NCCL_CUMEM_ENABLE": "0"}
    assert trainer_fleet_environment(load_config(CONFIG, ["rollout.backend=sglang"])) == {}
    environ = {"NCCL_CUMEM_ENABLE": "1"}  # a different value would split the group: replaced
    apply_trainer_fleet_environment(distributed, environ)
    assert environ == {"NCCL_CUMEM_ENABLE": "0"}
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "real_megatron.cli",
            "launch-plan",
            str(CONFIG),
            "rollout.backend=sglang",
            "rollout.weight_sync=distributed",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "TRAINER_ENV=NCCL_CUMEM_ENABLE=0" in plan.stdout.splitlines(), plan.stdout + plan.stderr
    # `real-megatron train` sets it in its own environment before NCCL starts
    script = (
        "import os, sys; from real_megatron import cli, train as t; "
        "t.train = lambda cfg: sys.exit(0 if os.environ.get('NCCL_CUMEM_ENABLE') == '0' else 3); "
        "sys.argv[1:] = ['train', sys.argv[1], 'rollout.backend=sglang', 'rollout.weight_sync=distributed', "
        "'train.output_dir=' + sys.argv[2]]; sys.exit(cli.main())"
    )
    env = {k: v for k, v in os.environ.items() if k != "NCCL_CUMEM_ENABLE"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(CONFIG), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_servers_on_several_nodes_listen_on_the_nodes_address_not_every_interface():
    assert bind_address("127.0.0.1", None) == "127.0.0.1"
    assert bind_address("node", "lo") == "127.0.0.1"  # an interface's own address
    with pytest.raises(FleetError, match="rollout.server_interface='no-such0'"):
        bind_address("node", "no-such0")
    try:
        resolved = socket.gethostbyname(socket.gethostname())
    except OSError:
        resolved = None
    if resolved and not resolved.startswith("127."):
        assert bind_address("node", None) == resolved
    else:  # a hostname only this machine can reach is refused, with the way out
        with pytest.raises(FleetError, match="set rollout.server_interface"):
            bind_address("node", None)
    sbatch = (ROOT / "slurm" / "train.sbatch").read_text()
    assert "SERVER_HOST=node; (( ONE_NODE )) && SERVER_HOST=127.0.0.1" in sbatch and "umask 077" in sbatch


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang's environment: run tools/install_sglang.sh")
def test_a_launch_with_the_key_trains_and_keeps_its_files_private(tmp_path):
    """Two steps through `real-megatron launch` (a `serve` server with the run's key, weights from
    disk): the run works, and its key, registry, weights, logs and checkpoints are the user's alone."""
    run = tmp_path / "run"
    overrides = [
        f"train.output_dir={run}",
        *tiny_run_overrides(tmp_path, size="tiny", steps=2),
        "checkpoint.every_steps=2",
        *QUIET,
        "rollout.backend=sglang",
        *CPU_SGLANG,
    ]
    out = subprocess.run(
        cli("launch", str(CONFIG), *overrides), capture_output=True, text=True, env=sglang_env(), timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    key = read_key_file(run / "fleet_api_key")
    assert mode(run / "fleet_api_key") == 0o600 and mode(run) == 0o700
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "step_s" in m] == [1, 2]
    assert "POST /generate" in (run / "logs" / "sglang_0.log").read_text()
    for sub in ("servers", "weights", "logs", "checkpoints"):
        assert mode(run / sub) == 0o700, sub
    written = [p for p in run.rglob("*")]
    loose = [str(p) for p in written if mode(p) & 0o077]
    assert not loose, loose  # nothing readable by group or others
    assert list((run / "weights").glob("v*/*.safetensors"))  # the weights the server loaded, private like the rest
    assert not any(key in p.read_text(errors="replace") for p in (run / "servers").glob("*"))
    assert not any(
        key in p.read_text(errors="replace") for p in (run / "logs").glob("*.log") if p.name != "sglang_0.log"
    )  # SGLang's own log lists its arguments (private, above)
