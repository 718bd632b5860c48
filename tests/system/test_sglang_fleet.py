"""A real SGLang server fleet on CPU (SGLang's own environment, see tools/install_sglang.sh).

Two servers of a tiny Qwen2 checkpoint; the only stand-in is tests/support/sgl_kernel (the CPU
kernels PyPI lacks). Checks: greedy ids equal transformers', log-probs equal the actor's, a weight
update from disk switches to exactly the new model's outputs, and killing a server mid-batch loses
and duplicates nothing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_qwen2
from tiny_run import server_ports

from real_megatron.rollout.sglang_env import default_server_python
from real_megatron.rollout.sglang_fleet import FleetError, SGLangFleet
from real_megatron.rollout.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]
CPU_SERVER_ARGS = [
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--max-total-tokens",
    "4096",
    "--dtype",
    "float32",
    "--skip-tokenizer-init",
    "--sleep-on-idle",  # an idle scheduler otherwise spins a core the trainer needs
]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [20, 21, 22, 23]]


def make_model(path, seed):
    model = tiny_qwen2(
        128,
        seed=seed,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
        torch_dtype="float32",
    )
    model.save_pretrained(path)
    return model


def assert_greedy_of(model, prompt, output):
    """output is model's greedy continuation of prompt: every token is the argmax given the ones
    before it, except at an exact-enough tie (top-2 logits within 1e-4), after which paths may part."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].double()
    for step, token in enumerate(output):
        best = int(logits[step].argmax())
        if token != best:
            margin = float(logits[step, best] - logits[step, token])
            assert margin < 1e-4, f"step {step}: server chose {token}, argmax {best} is ahead by {margin:.2e}"
            return False
    return True


def greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ].tolist()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    python = default_server_python()
    assert python != "python3", (
        "SGLang's environment is missing: run tools/install_sglang.sh (or tools/install.sh --with-sglang)"
    )
    root = tmp_path_factory.mktemp("sglang")
    a, b = make_model(root / "a", 0), make_model(root / "b", 1)
    previous = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # as `real-megatron train` sets it for the trainer
    # one compute thread per server: two servers with a thread per core each oversubscribe a 2-core
    # machine, and spinning OpenMP threads then slow generation down a hundredfold
    env = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(ROOT / "tests" / "support"), "OMP_NUM_THREADS": "1"}
    base = server_ports() + 2000  # clear of the ports this worker's runs take
    taken = socket.socket()  # another run's server on the base port: the fleet takes the next free ones
    taken.bind(("127.0.0.1", base))
    fleet = SGLangFleet(
        model_path=str(root / "a"),
        num_servers=2,
        base_port=base,
        server_python=python,
        server_args=CPU_SERVER_ARGS,
        env=env,
        log_dir=root / "logs",
        health_timeout_s=300,
        request_timeout_s=120,
        max_requests_per_server=4,
        gpus=["3", "5"],
    )  # CPU servers ignore them; each must get its own
    taken.close()
    ports = [int(s.url.rsplit(":", 1)[1]) for s in fleet.servers]
    assert base < ports[0] < ports[1], (base, ports)
    if previous is None:
        os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS")
    else:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = previous
    try:
        yield fleet, a, b, root
    finally:
        fleet.stop()
        assert all(s.process.poll() is not None for s in fleet.servers)


def test_greedy_ids_equal_transformers_and_logprobs_equal_the_actors(fleet):
    fleet, model_a, _, root = fleet
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    groups = fleet.generate(PROMPTS, n=2, params=params)
    pairs = []
    exact = 0
    for prompt, group in zip(PROMPTS, groups):
        expect = greedy(model_a, prompt, 12)
        for sample in group:
            assert sample.finish_reason == "length" and len(sample.logprobs) == 12
            exact += sample.output_ids == expect
            assert_greedy_of(model_a, prompt, sample.output_ids)
        pairs.append([prompt, group[0].output_ids])
    assert exact >= len(PROMPTS)  # most identical outright; any difference only after a tie
    # sampled at temperature 0.7: SGLang reports log-probs of softmax(logits / 0.7), the distribution it
    # sampled from, and the actor computes the same at rollout.temperature (the mismatch metrics compare them)
    sampled = fleet.generate(PROMPTS, n=1, params=SamplingParams(temperature=0.7, max_new_tokens=12, seed=3))
    pairs += [[prompt, group[0].output_ids] for prompt, group in zip(PROMPTS, sampled)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    actor = {}
    for temperature in (1.0, 0.7):
        out = root / f"actor-{temperature}.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "support" / "actor_logprobs.py"),
                "--hf",
                str(root / "a"),
                "--pairs",
                str(root / "pairs.json"),
                "--out",
                str(out),
                "--temperature",
                str(temperature),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        actor[temperature] = json.loads(out.read_text())
    n = len(PROMPTS)
    diff = max(abs(x - y) for group, ref in zip(groups, actor[1.0][:n]) for x, y in zip(group[0].logprobs, ref))
    diff_t = max(abs(x - y) for group, ref in zip(sampled, actor[0.7][n:]) for x, y in zip(group[0].logprobs, ref))
    off = max(abs(x - y) for group, ref in zip(sampled, actor[1.0][n:]) for x, y in zip(group[0].logprobs, ref))
    print(
        f"max |engine log-prob - actor log-prob| = {diff:.2e} greedy, {diff_t:.2e} at temperature 0.7 "
        f"({off:.2e} against the actor at temperature 1)"
    )
    assert diff <= 1e-4 and diff_t <= 1e-4  # measured 1.4e-6 (fp32 server; SGLang's default dtype on CPU is bf16)
    assert off > 100 * diff_t  # the temperature is not a rounding matter
    assert fleet.last_throughput > 0


def test_multi_turn_trajectories_train_the_ids_the_servers_sampled_on_one_server_each(fleet):
    """Trajectories of an environment by import path through the real fleet, one thread each: a
    trajectory's turns all go to one server, the ids at the model's positions are exactly what the
    servers returned, and the actor's log-probs of them in the whole trajectory's context equal the
    servers' (the between-turn ids, the template's, are context only)."""
    from chat_tokenizer import chat_tokenizer

    from real_megatron.agents.environment import load_environment_factory
    from real_megatron.agents.rollouts import TrajectoryRunner, TurnLimits

    fleet, _, _, root = fleet
    tok = chat_tokenizer()  # 95 ids, inside the model's 128
    calls = []

    class Recording:  # the fleet, with every call's prompt, output and server noted
        concurrent_calls = True

        def generate(self, prompts, n, params, **kw):
            groups = fleet.generate(prompts, n, params, **kw)
            calls.extend((prompts[0], s.output_ids, s.extra["server"]) for s in groups[0])
            return groups

    stops = (tok.convert_tokens_to_ids("<|im_end|>"), *tok.convert_tokens_to_ids(list("0123456789")))
    make = load_environment_factory("multiturn_env:CountingEnv", {"turns": 3})
    runner = TrajectoryRunner(make, tok, stops, TurnLimits(max_turns=3, total_tokens=400, tokens_per_turn=16))
    examples = [
        {
            "prompt": [{"role": "user", "content": f"Count to {k}."}],
            "ground_truth": str(k),
            "data_source": "",
            "extra_info": {},
        }
        for k in range(4)
    ]
    groups = runner.run(Recording(), examples, 2, SamplingParams(temperature=1.0, max_new_tokens=300))
    trajectories = [t for g in groups for t in g]
    assert max(t.model_turns for t in trajectories) >= 2
    for t in trajectories:
        mine = [c for c in calls if t.context[: len(c[0]) + len(c[1])] == c[0] + c[1]]
        assert len(mine) == t.model_turns and len({server for _, _, server in mine}) == 1
        assert [x for x, m in zip(t.ids, t.mask) if m] == [i for _, out, _ in mine for i in out]
    (root / "mt_pairs.json").write_text(json.dumps([[t.prompt_ids, t.ids] for t in trajectories]))
    out = root / "mt_actor.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "support" / "actor_logprobs.py"), "--hf", str(root / "a")]
        + ["--pairs", str(root / "mt_pairs.json"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    actor = json.loads(out.read_text())
    diff = max(abs(x - y) for t, ref in zip(trajectories, actor) for x, y, m in zip(t.logprobs, ref, t.mask) if m)
    assert diff <= 1e-4, diff


def test_weight_update_from_disk_switches_to_the_new_model_exactly(fleet):
    fleet, model_a, model_b, root = fleet
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    fleet.update_weights_from_disk(root / "b", version=1)
    groups = fleet.generate(PROMPTS, n=2, params=params)
    for p, g in zip(PROMPTS, groups):
        for sample in g:
            assert sample.weight_version == 1
            assert_greedy_of(model_b, p, sample.output_ids)
    assert any(greedy(model_a, p, 10) != greedy(model_b, p, 10) for p in PROMPTS)  # the switch is visible
    fleet.update_weights_from_disk(root / "a", version=2)
    back = fleet.generate(PROMPTS[:1], 1, params)[0][0]
    assert back.weight_version == 2 and assert_greedy_of(model_a, PROMPTS[0], back.output_ids)


def test_weights_change_under_running_requests_which_pause_and_go_on(fleet):
    """The asynchronous pipeline's case: a batch is being generated when new weights arrive. The
    update does not wait for the batch; running requests are paused (retracted), continue on the
    new weights, and keep the version they were sent on (their oldest tokens')."""
    fleet, model_a, model_b, root = fleet
    fleet.update_weights_from_disk(root / "a", version=20)
    prompts = [[i % 120 + 1, 3] for i in range(12)]
    result, started = {}, time.monotonic()
    worker = threading.Thread(
        target=lambda: result.update(
            groups=fleet.generate(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=400))
        )
    )
    worker.start()
    while fleet.in_flight < 4 and time.monotonic() - started < 30:
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the batch
    assert fleet.in_flight > 0
    pauses = pause_calls(fleet)
    update_start = time.monotonic()
    fleet.update_weights_from_disk(root / "b", version=21)
    update_s = time.monotonic() - update_start
    worker.join(300)
    batch_s = time.monotonic() - started
    samples = [s for g in result["groups"] for s in g]
    assert len(samples) == 24 and all(s is not None for s in samples)
    sent = {(s.weight_version, s.extra["served_version"]) for s in samples}
    assert (20, "21") in sent, sent  # straddled the update: sent on 20, finished on 21
    assert sent <= {(20, "20"), (20, "21"), (21, "21")}
    for p, group in enumerate(result["groups"]):  # greedy: model a's tokens, then model b's from where it paused
        for sample in group:
            out = sample.output_ids
            if sample.extra["served_version"] == "20":
                assert assert_greedy_of(model_a, prompts[p], out)
            elif sample.weight_version == 21:
                assert assert_greedy_of(model_b, prompts[p], out)
            else:
                switch = next(
                    j for j in range(len(out) + 1) if j == len(out) or not greedy_step(model_a, prompts[p], out, j)
                )
                assert assert_greedy_of(model_b, prompts[p] + out[:switch], out[switch:]), (p, switch, out)
    assert pause_calls(fleet) > pauses
    assert update_s < batch_s / 2, (update_s, batch_s)  # generation stopped only for the update
    idle = pause_calls(fleet)
    fleet.update_weights_from_disk(root / "a", version=22)  # nothing running: nothing to pause
    assert pause_calls(fleet) == idle


def greedy_step(model, prompt, out, j) -> bool:
    """out[j] is model's argmax after prompt + out[:j]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out[:j]])).logits[0, -1]
    return int(logits.argmax()) == out[j]


def pause_calls(fleet) -> int:
    return sum(s.log_path.read_text().count("POST /pause_generation") for s in fleet.servers)


def test_killing_a_server_mid_batch_loses_and_duplicates_nothing(fleet):
    fleet, _, _, _ = fleet
    prompts = [[i % 120 + 1, (i * 7) % 120 + 1] for i in range(24)]
    params = SamplingParams(temperature=1.0, max_new_tokens=200)
    victim = fleet.servers[0]
    killer = threading.Timer(1.0, lambda: os.killpg(victim.process.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    groups = fleet.generate(prompts, n=4, params=params)
    killer.join()
    assert victim.restarts == 1  # launched mode: it is being restarted
    assert [len(g) for g in groups] == [4] * 24
    assert all(
        s is not None and s.prompt_index == p and s.sample_index == k and 0 < len(s.output_ids) <= 200
        for p, g in enumerate(groups)
        for k, s in enumerate(g)
    )
    assert time.monotonic() - start < 300
    # the restarted server comes back on the current weights and serves again
    deadline = time.monotonic() + 240
    while not victim.alive and time.monotonic() < deadline:
        time.sleep(2)
    assert victim.alive and victim.weight_version == fleet.weight_version


def test_attached_mode_and_no_server_left(fleet):
    fleet, _, _, _ = fleet
    attached = SGLangFleet(urls=[s.url for s in fleet.servers], health_timeout_s=60, api_key=fleet.api_key)
    out = attached.generate([[5, 6]], 1, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert len(out[0][0].output_ids) == 3
    attached.stop()  # attached servers are not ours: they keep running
    assert all(s.process.poll() is None for s in fleet.servers)
    dead = SGLangFleet.__new__(SGLangFleet)
    dead.__dict__.update(attached.__dict__)
    for s in dead.servers:
        s.alive = False
    with pytest.raises(FleetError, match="no SGLang server is left alive"):
        dead.generate([[5, 6]], 1, SamplingParams(max_new_tokens=3))


def test_broadcast_weight_sync_over_gloo_reaches_every_server_and_a_restarted_one(fleet):
    """rollout.weight_sync: distributed, for real: a gloo group of this process and both servers
    (NCCL on GPUs), buckets smaller than the model, SGLang's begin/update/end protocol."""
    from real_megatron.rollout.broadcast_sync import BroadcastWeightSync

    fleet, model_a, model_b, _ = fleet
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    sync = BroadcastWeightSync(fleet, bucket_bytes=64 * 1024, timeout_s=120)
    try:
        version = fleet.weight_version + 1
        state = model_b.state_dict()
        sent = sync.push(state.items(), version, torch.float32)
        assert sent == sum(t.numel() * 4 for t in state.values()) and len(sync.members) == 2
        groups = fleet.generate(PROMPTS, n=2, params=params)
        for p, g in zip(PROMPTS, groups):
            for sample in g:
                assert sample.weight_version == version
                assert_greedy_of(model_b, p, sample.output_ids)
        # a server dies: the next batch finds out, it restarts and waits out of rotation (its
        # weights came by broadcast, not from a file it could reload)
        victim = fleet.servers[1]
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)
        fleet.generate(PROMPTS, n=2, params=params)
        deadline = time.monotonic() + 240
        while not victim.awaiting_weights and time.monotonic() < deadline:
            time.sleep(2)
        assert victim.awaiting_weights and not victim.alive
        # the next push makes a new group with it and puts it back in rotation on the new weights
        sync.push(model_a.state_dict().items(), version + 1, torch.float32)
        assert victim.alive and victim.weight_version == version + 1 and sync.pushes == 2
        for p, g in zip(PROMPTS, fleet.generate(PROMPTS, n=2, params=params)):
            for sample in g:
                assert sample.weight_version == version + 1
                assert_greedy_of(model_a, p, sample.output_ids)
    finally:
        sync.close()


def test_each_launched_server_keeps_its_own_gpus_and_the_request_bound_follows_the_fleet(fleet):
    """Servers launched outside Slurm get disjoint CUDA_VISIBLE_DEVICES (restarted ones too, after the
    kill test above); in-flight requests scale with the number of servers."""
    fleet, *_ = fleet
    assert fleet.max_in_flight == 4 * len(fleet.servers)
    for server, want in zip(fleet.servers, ["3", "5"]):
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={want}".encode() in environ, (server.index, server.restarts)
        assert not any(v.startswith(b"CUDA_DEVICE_MAX_CONNECTIONS=") for v in environ)  # the trainer's only


def status_of(url: str, path: str, body=None, key=None) -> int:
    """The HTTP status `url` answers `path` with (the body, if any, POSTed as JSON)."""
    import urllib.error

    from real_megatron.rollout.sglang_fleet import http_json

    try:
        http_json(url + path, body, timeout=30, key=key)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_the_key_the_servers_refuse_generation_weights_and_control(fleet):
    """Launched servers require the fleet's key: without it, or with another, /generate, the weight
    endpoints and /pause_generation answer 401; /health stays open (the registration wait uses it).
    The key is not on any server's command line (every user of a node can read those), and the
    servers' logs, which SGLang fills with its arguments, are the user's alone."""
    fleet, _, _, root = fleet
    key = fleet.api_key
    assert key and len(key) >= 40
    calls = [
        ("/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}),
        ("/update_weights_from_disk", {"model_path": str(root / "b")}),
        ("/pause_generation", {"mode": "retract"}),
        (
            "/init_weights_update_group",
            {
                "master_address": "127.0.0.1",
                "master_port": 1,
                "rank_offset": 1,
                "world_size": 2,
                "group_name": "x",
                "backend": "gloo",
            },
        ),
        ("/flush_cache", {}),
        ("/get_server_info", None),
    ]
    for server in fleet.servers:
        for path, body in calls:
            assert status_of(server.url, path, body) == 401, (server.url, path)
            assert status_of(server.url, path, body, key="not-" + key) == 401, (server.url, path)
        assert status_of(server.url, "/health") == 200
        assert status_of(server.url, "/generate", calls[0][1], key=key) == 200
        assert key.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert server.auth_file is None  # read at start, then removed
        assert server.log_path.stat().st_mode & 0o777 == 0o600
    assert not any(key in p.read_text() for p in Path(tempfile.gettempdir()).glob("sglang-auth-*.yaml"))


def test_a_wrong_key_is_an_error_at_attach_naming_its_file(fleet):
    fleet, *_ = fleet
    with pytest.raises(FleetError, match=r"refused the fleet's key \(/run/key-file\) with HTTP 401"):
        SGLangFleet(urls=[fleet.servers[0].url], api_key="wrong", key_source="/run/key-file", health_timeout_s=60)
    with pytest.raises(FleetError, match=r"requires a key \(HTTP 401\): give its file \(rollout.api_key_file"):
        SGLangFleet(urls=[fleet.servers[0].url], health_timeout_s=60)


def test_disk_weights_load_on_every_server_at_once_each_within_its_deadline(fleet):
    """A server that stops answering (SIGSTOP) while weights load is dropped after its own
    deadline, and the other, listed after it, has loaded at once rather than after that deadline."""
    fleet, _, _, root = fleet
    path, version = fleet.weights_path or root / "a", fleet.weight_version  # what the servers hold already
    live = [s for s in fleet.servers if s.alive]
    assert len(live) == 2
    deadline = 6
    attached = SGLangFleet(
        urls=[s.url for s in live], api_key=fleet.api_key, request_timeout_s=deadline, health_timeout_s=60
    )
    os.killpg(live[0].process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        attached.update_weights_from_disk(path, version)
        took = time.monotonic() - start
    finally:
        os.killpg(live[0].process.pid, signal.SIGCONT)
    hung, other = attached.servers
    assert not hung.alive and other.alive and other.weight_version == version
    assert deadline <= took < 2 * deadline, took  # the hung server's deadline, not the sum of two
    begin, end = attached.last_calls[other.index]
    assert end < deadline / 2, attached.last_calls  # did not wait for the hung one
    print(
        f"with one server hung: {took:.1f}s (deadline {deadline}s); the other began after {begin:.2f}s, "
        f"done after {end:.2f}s"
    )
