"""KL to the reference model (algorithm.kl: reference): the frozen initial weights on the actor's
layout, log pi_ref from the log-prob pass, the term's gradient, and the reference across a resume.

Layout parity (TP=2, PP=2 against one process) is in tests/integration/test_actor_parity.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from real_megatron.actor.reference import RECORD, fingerprint, record_initial_model, recorded_initial_model
from real_megatron.objectives import PolicyBatch, build_objective

ROOT = Path(__file__).resolve().parents[2]


def kl_batch(seed=5):
    """Packed tokens of 6 sequences (lengths 2-6), some tokens out of the loss, one rollout inactive."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 5, 3, 6, 4, 3])
    seq_index = torch.repeat_interleave(torch.arange(6), lengths)
    T = len(seq_index)
    ref = -torch.rand(T, generator=gen, dtype=torch.float64) * 3
    old = ref + torch.randn(T, generator=gen, dtype=torch.float64) * 0.2
    lp = (old + torch.randn(T, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    mask = torch.rand(T, generator=gen) > 0.2
    active = torch.tensor([True, True, True, True, False, True])
    return PolicyBatch(
        lp,
        old,
        mask,
        seq_index,
        torch.tensor([1.0, 0, 1, 0, 1, 0]),
        torch.tensor([0, 0, 0, 1, 1, 1]),
        ref_logprobs=ref,
        active=active,
    )


@pytest.mark.parametrize("target", ["reference", "old"])
def test_kl_gradient_matches_the_closed_form(target):
    """d/d log pi_t of coef x sum_seq mean_t k3, k3 = e^(q-p) - (q-p) - 1: coef (1 - e^(q_t - p_t)) / n_s
    on the tokens in the loss (n_s: its sequence's tokens in the loss), 0 elsewhere and on inactive
    rollouts; the policy term's gradient is unchanged by the KL option."""
    coef = 0.37
    b = kl_batch()
    with_kl = build_objective("real", kl=target, kl_coef=coef)(b)
    without = build_objective("real")(b)
    (g_with,) = torch.autograd.grad(with_kl["groups"] + with_kl["sequences"], b.logprobs)
    (g_without,) = torch.autograd.grad(without["groups"], b.logprobs)
    q = b.ref_logprobs if target == "reference" else b.old_logprobs
    inside = b.loss_mask & b.active[b.seq_index]
    counts = torch.bincount(b.seq_index[inside], minlength=6).double()
    expect = torch.where(
        inside, coef * (1 - torch.exp(q - b.logprobs.detach())) / counts[b.seq_index].clamp_min(1), 0.0
    )
    torch.testing.assert_close(g_with - g_without, expect, rtol=1e-12, atol=1e-14)
    assert expect.abs().max() > 1e-3  # the term really has a gradient here


def tiny_actor(kl, offload=False, lr=1e-2):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_actor import TINY

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import OptimConfig

    spec = ArchSpec.from_hf(TINY)
    weights = init_hf_state_dict(spec, 0)
    settings = ActorSettings(
        optim=OptimConfig(lr=lr),
        groups_per_mini_batch=4,
        total_steps=10,
        actor=ActorConfig(prompts_per_micro_batch=2, reference_offload=offload),
    )
    return Actor(spec, settings, build_objective("real", kl=kl, kl_coef=0.1), weights.__getitem__)


def _kl_steps(rank, world_size, out):
    """Three RL steps of one mini-batch each with kl='reference', then kl='old': kl_mean per step."""
    from tiny_actor import tiny_rollouts

    from real_megatron.actor.distributed import init_distributed

    init_distributed(tp=1, pp=1, timeout_s=120, seed=1)
    result = {}
    for kl in ("reference", "old"):
        actor = tiny_actor(kl, offload=kl == "reference")
        result[kl] = [actor.train_step(tiny_rollouts(), step=s) for s in (1, 2, 3)]
        if kl == "reference":  # frozen: the reference chunks still hold the initial weights
            from real_megatron.actor.weights import init_hf_state_dict, iter_hf_tensors

            initial = init_hf_state_dict(actor.spec, 0)
            ref = dict(iter_hf_tensors(actor.reference.chunks, actor.spec))
            result["reference_frozen"] = all(torch.equal(ref[k], initial[k]) for k in ref)
            result["actor_moved"] = any(not torch.equal(v, initial[k]) for k, v in actor.hf_tensors())
    torch.save(result, out)


def test_kl_is_zero_at_the_first_update_of_step_one_and_positive_after(tmp_path):
    """Step 1 has one update (one mini-batch): pi_theta = pi_old = pi_ref, so k3 is exactly 0; once
    the actor has moved, KL to the reference is > 0 and grows; KL to pi_old is 0 at every step's
    first update (one mini-batch per step here). The reference's weights stay the initial ones."""
    from multiprocess import run_processes

    out = tmp_path / "kl.pt"
    run_processes(_kl_steps, 1, str(out))
    result = torch.load(out)
    ref = [m["kl_mean"] for m in result["reference"]]
    assert ref[0] == 0.0 and 0 < ref[1] < ref[2], ref
    assert all(m["ref_logprobs_s"] > 0 for m in result["reference"])
    assert [m["kl_mean"] for m in result["old"]] == [0.0, 0.0, 0.0]
    assert "ref_logprobs_s" not in result["old"][0]  # no reference model without kl='reference'
    assert result["reference_frozen"] and result["actor_moved"]


def test_initial_model_record_names_what_changed(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"x" * 3_000_000)
    run = tmp_path / "run"
    record_initial_model(run, model)
    assert recorded_initial_model(run) == model.resolve()
    before = fingerprint(model)
    with (model / "model.safetensors").open("r+b") as f:  # rewritten at its end: another model
        f.seek(2_999_990)
        f.write(b"y")
    assert fingerprint(model) != before
    with pytest.raises(ValueError, match=f"{RECORD}.*has changed"):
        recorded_initial_model(run)
    with pytest.raises(FileNotFoundError, match=RECORD):
        recorded_initial_model(tmp_path / "elsewhere")


TOY = [
    "task.warmstart_target=null",
    "task.warmstart_max_steps=20",
    "task.eval_prompts=16",
    "task.train_prompts=400",
    "eval.k=1",
    "eval.every_steps=0",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "optim.warmup_steps=1",
    "rollout.max_new_tokens=16",
    "eval.max_new_tokens=16",
    "train.prompts_per_step=8",
    "train.prompts_per_mini_batch=4",
    "actor.prompts_per_micro_batch=2",
    "train.steps=4",
    "logging.plot=false",
    "checkpoint.save_hf_final=false",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "algorithm.kl=reference",
    "algorithm.kl_coef=0.05",
]


def _train(tmp_path, name, kill_at=None, expect=0):
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--output-dir",
        str(tmp_path / name),
        f"task.cache_dir={tmp_path / 'cache'}",
        *TOY,
    ]
    env = dict(os.environ, REAL_MEGATRON_KILL_AT=kill_at or "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == expect, (kill_at, proc.returncode, proc.stderr[-4000:])
    return proc.stderr


def _kl_by_step(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["kl_mean"], r["loss"]) for r in rows if "kl_mean" in r}


@pytest.mark.slow
def test_resume_keeps_the_initial_model_as_reference(tmp_path):
    """Killed after step 3 (checkpoint at step 2) and run again: steps 3-4 penalise the same KL as
    the uninterrupted run's, > 0 at the first update (a reference loaded from the checkpoint would
    give 0 there); a changed initial model stops the resume with the record's name."""
    _train(tmp_path, "straight")
    straight = _kl_by_step(tmp_path / "straight")
    assert list(straight) == [1, 2, 3, 4] and straight[1][0] < straight[3][0] and straight[3][0] > 0, straight
    record = json.loads((tmp_path / "straight" / RECORD).read_text())
    assert record["path"].endswith("warmstart")
    _train(tmp_path, "resumed", kill_at="after_update:3", expect=-signal.SIGKILL)
    _train(tmp_path, "resumed")
    assert _kl_by_step(tmp_path / "resumed") == straight
    # the record is what a resume trusts: a different fingerprint is refused, by name
    path = tmp_path / "resumed" / RECORD
    path.write_text(json.dumps(dict(json.loads(path.read_text()), fingerprint="0" * 64)))
    err = _train(tmp_path, "resumed", expect=1)
    assert RECORD in err and "has changed" in err, err[-2000:]
