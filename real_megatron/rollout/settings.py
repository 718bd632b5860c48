"""The rollout side's settings: the `rollout` section (sampling, the engine, the SGLang fleet and
how weights reach it), its defaults and its own checks. Checks that involve other sections are
config.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class RolloutConfig:
    backend: Literal["local", "sglang"] = "local"
    n_samples: int = 8  # G: rollouts per prompt
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    stop_token_ids: list[int] = field(default_factory=list)
    use_engine_logprobs: bool = False  # default: the actor recomputes exact old log-probs
    # SGLang fleet: attach to `server_urls`, or to the `num_servers` servers that register in
    # `server_registry` (a directory; slurm/train.sbatch starts them as their own job step),
    # or launch `num_servers` servers from the trainer.
    server_urls: list[str] = field(default_factory=list)
    server_registry: Optional[str] = None
    num_servers: int = 1
    server_tp: int = 1
    server_host: str = "127.0.0.1"
    # `serve --host node` (slurm/train.sbatch on several nodes) listens on this network interface's
    # address (e.g. ib0); None: the address this node's hostname resolves to. Never 0.0.0.0.
    server_interface: Optional[str] = None
    # launched servers take the first free ports from here (8 x server_tp apart): another run on the
    # same machine, or a server left behind, moves them up rather than failing the run
    server_base_port: int = 30000
    server_python: Optional[str] = None  # interpreter of SGLang's own environment
    server_args: list[str] = field(default_factory=list)  # passed through to sglang.launch_server
    # the servers' bearer key: None = RUN_DIR/fleet_api_key, a random key made with the run
    # directory (mode 0600); a file of your own (one line, mode 0600) for servers started with it
    api_key_file: Optional[str] = None
    weight_sync: Literal["disk", "distributed"] = "disk"
    # distributed: the address servers reach trainer rank 0 at (default $MASTER_ADDR, else
    # 127.0.0.1), and the size of one broadcast bucket
    weight_sync_address: Optional[str] = None
    weight_sync_bucket_mb: int = 512
    health_timeout_s: float = 600.0
    request_timeout_s: float = 1800.0
    # requests in flight per server: SGLang batches hundreds of sequences per GPU; the fleet's
    # bound is this times the number of live servers. 0: ceil(train.prompts_per_step x n_samples /
    # servers), the whole step in flight (the paper's 128 prompts x 8 on 8 servers: 128 each)
    max_requests_per_server: int = 0
    # GPUs (ids as the trainer sees them) for servers the trainer launches, server_tp each; empty:
    # the GPUs of this node after the trainer's parallel.gpus_per_node
    server_gpus: list[int] = field(default_factory=list)
    # nodes of their own for the servers in a Slurm job (slurm/train.sbatch); 0: the servers run on
    # the trainer's node(s), on the GPUs after the trainer's parallel.gpus_per_node (one 8-GPU node)
    fleet_nodes: int = 1
    # asynchronous rollouts: the fleet generates up to this many batches ahead while the actor
    # trains, and no rollout trained on was sampled more than max_staleness weight versions ago;
    # 0 = generate, then train (synchronous)
    max_staleness: int = 0
    # --- multi-turn rollouts (real_megatron/agents/) ------------------------------------------------
    # an environment class by import path (module.path:ClassName), one instance per trajectory,
    # made with `environment_args`; None with `tools` empty: single-turn rollouts
    environment: Optional[str] = None
    environment_args: dict[str, Any] = field(default_factory=dict)
    # tools offered to the model (`python`, or module.path:function); without `environment` they
    # make the tool environment (agents/tool_env.py)
    tools: list[str] = field(default_factory=list)
    # model turns per trajectory at most; a trajectory still going after them is truncated. In a
    # multi-turn run rollout.max_new_tokens is the trajectory's total budget after the prompt
    # (model turns and what comes between them); one past it is truncated too.
    max_turns: int = 8
    # at most this many tokens per model turn (0: the rest of the trajectory's budget)
    max_tokens_per_turn: int = 0
    # --- the tool environment (rollout.tools; agents/tool_env.py, agents/sandbox.py) --------------
    # deadline of one tool call (the python tool's wall clock per cell); calls of one turn run
    # concurrently, at most tool_max_calls_per_turn of them (the rest answered with an error)
    tool_timeout_s: float = 10.0
    tool_max_calls_per_turn: int = 8
    tool_max_result_chars: int = 4000  # a tool's result (a cell's output) is cut to this many characters
    # the python tool's sandbox: CPU seconds per cell, address space, and how it is isolated:
    # "namespaces" (no network, own PID and mount namespaces; refuses to run where the kernel does
    # not allow them), "process" (limits and a scrubbed environment only), "auto" (namespaces where
    # available, else process, logged once); sandbox_url: a SandboxFusion server (/run_code) instead
    sandbox_cpu_s: float = 10.0
    sandbox_memory_mb: int = 1024
    sandbox_isolation: Literal["auto", "namespaces", "process"] = "auto"
    sandbox_url: Optional[str] = None

    # the servers run on the trainer's own GPUs (one per rollout.server_tp of them) and the two take
    # turns: the servers release their memory while the actor trains, the actor moves its state to
    # host memory while they generate; weights go in as tensors (rollout/colocate.py). Synchronous only.
    colocate: bool = False

    @property
    def multi_turn(self) -> bool:
        return bool(self.environment or self.tools)

    def tool_settings(self) -> dict:
        """The tool environment's keyword arguments (ToolEnvironment's, beside `tools`)."""
        return {
            "tool_timeout_s": self.tool_timeout_s,
            "tool_max_calls_per_turn": self.tool_max_calls_per_turn,
            "tool_max_result_chars": self.tool_max_result_chars,
            "sandbox_cpu_s": self.sandbox_cpu_s,
            "sandbox_memory_mb": self.sandbox_memory_mb,
            "sandbox_isolation": self.sandbox_isolation,
            "sandbox_url": self.sandbox_url,
        }

    def check(self) -> list[str]:
        """What is wrong inside this section alone (each a sentence naming the key); [] if nothing."""
        errors = []
        if self.temperature <= 0:
            errors.append(
                f"rollout.temperature must be > 0, got {self.temperature}: greedy or no sampling makes every group "
                "uniform (nothing to learn), and the actor's log-probs are taken at this temperature"
            )
        if not 0 < self.top_p <= 1:
            errors.append(f"rollout.top_p must lie in (0, 1], got {self.top_p}")
        if self.weight_sync == "distributed" and self.backend != "sglang":
            errors.append(
                "rollout.weight_sync='distributed' broadcasts to SGLang servers: it needs rollout.backend='sglang'"
            )
        if self.max_staleness < 0:
            errors.append(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_requests_per_server < 0:
            errors.append(
                f"rollout.max_requests_per_server must be >= 0 (0: from the batch), got {self.max_requests_per_server}"
            )
        if self.max_staleness > 0 and self.backend != "sglang":
            errors.append(
                f"rollout.max_staleness={self.max_staleness} needs rollout.backend='sglang': the embedded engine generates "
                "in the trainer's own process on the trainer's own devices, so there is nothing to overlap training with"
            )
        if self.colocate and self.backend != "sglang":
            errors.append(
                "rollout.colocate needs rollout.backend='sglang': the embedded engine already generates in the "
                "trainer's own process on the trainer's own devices, so there is nothing to colocate"
            )
        if self.colocate and self.max_staleness > 0:
            errors.append(
                f"rollout.colocate with rollout.max_staleness={self.max_staleness}: generating ahead means the servers "
                "generate while the actor trains, and colocated they share the same GPU memory, which one of them holds "
                "at a time; use the split layout (rollout.colocate: false) for asynchronous rollouts"
            )
        if self.colocate and self.weight_sync == "distributed":
            errors.append(
                "rollout.colocate takes weights from tensors on the servers' own GPUs (/update_weights_from_tensor); "
                "rollout.weight_sync='distributed' (an NCCL broadcast) applies to the split layout only"
            )
        if self.fleet_nodes < 0:
            errors.append(f"rollout.fleet_nodes must be >= 0, got {self.fleet_nodes}")
        if self.server_urls and self.server_registry:
            errors.append("rollout.server_urls and rollout.server_registry both name the servers: keep one")
        if (
            self.backend == "sglang"
            and self.weight_sync == "distributed"
            and not self.server_urls
            and self.num_servers < 1
        ):
            errors.append("rollout.weight_sync='distributed' needs at least one server")
        if self.max_turns < 1:
            errors.append(f"rollout.max_turns must be >= 1, got {self.max_turns}")
        if self.max_tokens_per_turn < 0:
            errors.append(
                f"rollout.max_tokens_per_turn must be >= 0 (0: the trajectory's budget), got {self.max_tokens_per_turn}"
            )
        if self.environment and ":" not in self.environment:
            errors.append(f"rollout.environment={self.environment!r}: expected module.path:ClassName")
        if self.environment_args and not self.environment and not self.tools:
            errors.append("rollout.environment_args is set but rollout.environment is not")
        for key in ("tool_timeout_s", "sandbox_cpu_s"):
            if getattr(self, key) <= 0:
                errors.append(f"rollout.{key} must be > 0, got {getattr(self, key)}")
        for key in ("tool_max_calls_per_turn", "tool_max_result_chars", "sandbox_memory_mb"):
            if getattr(self, key) < 1:
                errors.append(f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        if self.sandbox_url and not self.sandbox_url.startswith(("http://", "https://")):
            errors.append(f"rollout.sandbox_url={self.sandbox_url!r}: expected an http:// or https:// URL")
        return errors
