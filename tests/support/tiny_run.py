"""The tiny runs that integration and system tests share: the quickstart's task at toy sizes (a 20-step
warm-start into no band, few prompts, short answers), quiet logs, and the ways to start one (one
process, torchrun, `real-megatron launch` beside a CPU SGLang server)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SUPPORT = ROOT / "tests" / "support"

# SGLang on this CPU (docs/testing.md): the torch-native attention, a small KV cache, fp32 like the actor,
# and a scheduler that sleeps when idle (it would otherwise spin a core the trainer needs)
CPU_SGLANG_SERVER = (
    "rollout.server_args=[--device, cpu, --attention-backend, torch_native, --max-total-tokens, '4096', "
    "--dtype, float32, --skip-tokenizer-init, --sleep-on-idle]"
)


def server_ports() -> int:
    """The first of the ports this pytest worker's SGLang servers use: the suite runs on two workers
    (tests/conftest.py), and two servers starting at once would both find the same port free."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 21000 + 4000 * int(worker.removeprefix("gw") or 0)


# a fleet launched by a test's run: its server arguments and its ports
CPU_SGLANG = [CPU_SGLANG_SERVER, f"rollout.server_base_port={server_ports()}"]
QUIET = [
    "logging.progress_bar=false",
    "logging.plot=false",
    "logging.tensorboard=false",
    "checkpoint.save_hf_final=false",
]
# "tiny": a few seconds per step; "toy": enough prompts and tokens for metrics and eval to mean something
SIZES = {
    "tiny": dict(eval_prompts=8, train_prompts=100, k=1, tokens=16, prompts=4),
    "toy": dict(eval_prompts=24, train_prompts=400, k=2, tokens=24, prompts=8),
}


def tiny_run_overrides(
    tmp_path: Path, *, size: str = "toy", steps: int | None = None, eval_every: int = 0
) -> list[str]:
    """The quickstart at a test's size: its own task cache under tmp_path, a 20-step warm-start."""
    s = SIZES[size]
    out = [
        f"task.cache_dir={tmp_path / 'cache'}",
        "task.warmstart_max_steps=20",
        "task.warmstart_target=null",
        f"task.eval_prompts={s['eval_prompts']}",
        f"task.train_prompts={s['train_prompts']}",
        f"eval.k={s['k']}",
        f"eval.every_steps={eval_every}",
        "optim.warmup_steps=1",
        f"rollout.max_new_tokens={s['tokens']}",
        f"eval.max_new_tokens={s['tokens']}",
        f"train.prompts_per_step={s['prompts']}",
        "train.prompts_per_mini_batch=4",
        "actor.prompts_per_micro_batch=2",
    ]
    if steps is not None:
        out.append(f"train.steps={steps}")
    return out


def cli(*args: str) -> list[str]:
    """`real-megatron ARGS` as this Python runs it."""
    return [sys.executable, "-m", "real_megatron.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N ARGS` as this Python runs it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def sglang_env(**extra: str) -> dict:
    """The environment a run beside a CPU SGLang server needs: SGLang's CPU engine, one thread per
    process, and tests/support first on the path (the CPU kernels PyPI's SGLang lacks), keeping any
    path already set so the run imports the same real_megatron as the test."""
    path = os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)
