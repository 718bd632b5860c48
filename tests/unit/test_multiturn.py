"""Multi-turn trajectories, token in, token out: the chat template's glue (append-only, checked),
the rollout loop's limits, environments by import path (plain and async), the loss mask through the
batch builder and every objective (gradients at non-model tokens exactly zero, s̄ over the model's
tokens against float64), and the embedded engine's sampled ids trained as sampled."""

import json

import pytest
import torch
from chat_tokenizer import NOT_APPEND_ONLY, QWEN25_LIKE, chat_tokenizer
from multiturn_env import CountingEnv

from real_megatron.actor.batching import build_mini_batches
from real_megatron.agents.environment import EnvironmentHandle, environment_spec, load_environment_factory
from real_megatron.agents.rollouts import TrajectoryRunner, TurnLimits, routed_experts_of
from real_megatron.agents.trajectory import ChatGlue, TemplateError, check_append_only, render
from real_megatron.objectives import build_objective
from real_megatron.objectives.registry import PolicyBatch
from real_megatron.rollout.collect import trajectory_metrics
from real_megatron.rollout.types import Rollout, Sample, SamplingParams

TOOLS = CountingEnv().tools()
PROMPT = [{"role": "user", "content": "What is 12*34?"}]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def stop_ids(tok):
    return (tok.convert_tokens_to_ids("<|im_end|>"),)


class ScriptedEngine:
    """Stands in for the model's choices only: call k answers every context with script[k] (its ids
    and a distinct log-prob per token), cut at max_new_tokens like an engine. Real engines: the
    embedded-engine test below and tests/system/test_sglang_fleet.py."""

    def __init__(self, tok, script: list[str]):
        self.tok, self.script, self.calls, self.sampled = tok, script, 0, []

    def generate(self, prompts, n, params):
        out = []
        for p, _ in enumerate(prompts):
            ids = self.tok.encode(self.script[min(self.calls, len(self.script) - 1)], add_special_tokens=False)
            ids = ids + list(params.stop_token_ids[:1])
            finish = "stop"
            if len(ids) > params.max_new_tokens:
                ids, finish = ids[: params.max_new_tokens], "length"
            logprobs = [-0.01 * (len(self.sampled) + 1 + i) for i in range(len(ids))]
            self.sampled.append((ids, logprobs))
            out.append([Sample(p, 0, ids, logprobs, finish, weight_version=5 - self.calls)])
        self.calls += 1
        return out


def runner(tok, env=CountingEnv, max_turns=8, total=4096, per_turn=0):
    return TrajectoryRunner(env, tok, stop_ids(tok), TurnLimits(max_turns, total, per_turn))


def test_the_template_glue_is_an_append_only_suffix_and_whole_rendering_equals_turn_by_turn(tok):
    for tools in (None, TOOLS):
        glue = ChatGlue(tok, stop_ids(tok), tools)
        check_append_only(glue)  # raises if not
        assert tok.decode(glue.after_stop) == "\n"  # Qwen's newline after <|im_end|>
    glue = ChatGlue(tok, stop_ids(tok), TOOLS)
    assert tok.decode(glue.between([{"role": "tool", "content": "408"}])) == (
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    qwen3_like = NOT_APPEND_ONLY  # earlier assistant turns lose their reasoning, as Qwen3's template does
    assert qwen3_like != QWEN25_LIKE
    tok = chat_tokenizer(qwen3_like)
    glue = ChatGlue(tok, stop_ids(tok))
    with pytest.raises(TemplateError, match="not append-only: rendering the conversation turn by turn and rendering"):
        check_append_only(glue)
    plain = chat_tokenizer()
    plain.chat_template = None
    with pytest.raises(TemplateError, match="tools are offered to the model through its chat template"):
        ChatGlue(plain, stop_ids(tok), TOOLS)
    glue = ChatGlue(plain, stop_ids(tok))  # plain text, as single-turn prompts without a template
    assert (
        plain.decode(glue.between([{"role": "tool", "content": "7"}, {"role": "user", "content": "ok"}])) == "\n7\nok"
    )
    assert render(plain, PROMPT, True, None) == plain.encode(PROMPT[0]["content"], add_special_tokens=False)


def test_trajectory_ids_are_the_sampled_ids_and_the_glue_and_nothing_is_reencoded(tok):
    engine = ScriptedEngine(tok, ["Let me count.", "Again.", "ANSWER 408"])
    example = {"prompt": PROMPT, "ground_truth": "408", "data_source": "t", "extra_info": {}}
    (traj,) = runner(tok, lambda: CountingEnv(turns=5)).run(engine, [example], 1, SamplingParams(max_new_tokens=1000))[
        0
    ]
    assert traj.model_turns == 3 and traj.finish == "done" and not traj.truncated
    # the model's ids, where the mask says, are exactly what the engine sampled, in order, with its log-probs
    ids = torch.tensor(traj.ids)
    mask = torch.tensor(traj.mask)
    assert ids[mask].tolist() == [t for s, _ in engine.sampled for t in s]
    assert [x for x, m in zip(traj.logprobs, traj.mask) if m] == [x for _, lp in engine.sampled for x in lp]
    assert (torch.tensor(traj.logprobs)[~mask] == 0).all() and (~mask).sum() > 0
    # turn by turn == the template rendering the whole conversation (the last <|im_end|> is the model's own)
    whole = PROMPT + [
        {"role": "assistant", "content": "Let me count."},
        {"role": "tool", "content": "result 1"},
        {"role": "assistant", "content": "Again."},
        {"role": "tool", "content": "result 2"},
        {"role": "assistant", "content": "ANSWER 408"},
    ]
    rendered = render(tok, whole, False, TOOLS)
    assert traj.prompt_ids + traj.ids == rendered[:-1]
    assert [t["role"] for t in traj.turns] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert traj.weight_version == 3  # as old as its oldest turn (versions 5, 4, 3)
    assert traj.last_reply == "ANSWER 408"


def test_turn_and_token_limits_truncate_and_drop_what_follows_the_last_model_turn(tok):
    example = {"prompt": PROMPT, "ground_truth": "1", "data_source": "", "extra_info": {}}
    engine = ScriptedEngine(tok, ["Go on."])
    (traj,) = runner(tok, lambda: CountingEnv(turns=10), max_turns=2).run(engine, [example], 1, SamplingParams())[0]
    assert traj.finish == "turns" and traj.truncated and traj.model_turns == 2
    assert traj.mask[-1] and traj.ids[-1] == stop_ids(tok)[0]  # ends with the model's last turn
    prompt_len = len(traj.prompt_ids)
    for total in (prompt_len + 12, prompt_len + 20, prompt_len + 40):
        engine = ScriptedEngine(tok, ["Go on."])
        (traj,) = runner(tok, lambda: CountingEnv(turns=10), total=total).run(engine, [example], 1, SamplingParams())[0]
        assert traj.finish in ("tokens", "length") and traj.truncated
        assert len(traj.context) <= total and traj.mask[-1]
    engine = ScriptedEngine(tok, ["Go on."])
    limits = TurnLimits(10, 4096, 0, 30)  # 30 tokens after the prompt
    (traj,) = TrajectoryRunner(lambda: CountingEnv(turns=10), tok, stop_ids(tok), limits).run(
        engine, [example], 1, SamplingParams()
    )[0]
    assert traj.finish in ("tokens", "length") and len(traj.ids) <= 30 and traj.mask[-1]
    engine = ScriptedEngine(tok, ["Go on."])  # the call's max_new_tokens bounds the response too (evaluation's)
    (traj,) = runner(tok, lambda: CountingEnv(turns=10)).run(engine, [example], 1, SamplingParams(max_new_tokens=9))[0]
    assert traj.finish in ("tokens", "length") and len(traj.ids) <= 9
    engine = ScriptedEngine(tok, ["A long first turn."])
    (traj,) = runner(tok, lambda: CountingEnv(turns=3), per_turn=5).run(engine, [example], 1, SamplingParams())[0]
    assert traj.finish == "length" and traj.model_turns == 1 and len(traj.ids) == 5


def test_environments_load_by_import_path_async_ones_too_and_errors_name_the_key(tok):
    make = load_environment_factory("multiturn_env:AsyncCountingEnv", {"turns": 2, "reward": 1.0})
    engine = ScriptedEngine(tok, ["One.", "Two."])
    example = {"prompt": PROMPT, "ground_truth": "2", "data_source": "", "extra_info": {}}
    groups = runner(tok, make).run(engine, [example, example], 2, SamplingParams())
    assert [len(g) for g in groups] == [2, 2]
    assert all(t.reward == 1.0 and t.model_turns == 2 and t.stats == {"tool_calls": 1} for g in groups for t in g)
    with pytest.raises(ValueError, match="rollout.environment='no_such_module:Env': cannot import"):
        load_environment_factory("no_such_module:Env", {})
    with pytest.raises(ValueError, match="has no class or callable 'Nope'"):
        load_environment_factory("multiturn_env:Nope", {})
    with pytest.raises(ValueError, match=r"rollout.environment_args \['bogus'\]"):
        load_environment_factory("multiturn_env:CountingEnv", {"bogus": 1})()
    handle = EnvironmentHandle(CountingEnv())
    handle.env.step = lambda text: "not a triple"
    with pytest.raises(ValueError, match=r"CountingEnv.step\(\) must return \(messages, done, reward\)"):
        handle.step("x")

    from types import SimpleNamespace

    settings = SimpleNamespace(environment=None, environment_args={}, tools=["python"], tool_timeout_s=3.0)
    spec, args = environment_spec(settings)
    assert spec == "real_megatron.agents.tool_env:ToolEnvironment"
    assert args == {"tools": ["python"], "tool_timeout_s": 3.0}


def masked_rollouts(seed: int = 0):
    """4 groups x 4 trajectories: prompt, then model / between / model segments."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(4):
        prompt = torch.randint(1, 90, (4,), generator=gen).tolist()
        for k, reward in enumerate([1.0, 0.0, 1.0, 0.0]):
            a, b, c = 2 + k, 3, 1 + (k + g) % 3
            response = torch.randint(1, 90, (a + b + c,), generator=gen).tolist()
            mask = [True] * a + [False] * b + [True] * c
            logprobs = (-torch.rand(a + b + c, generator=gen)).tolist()
            out.append(Rollout(prompt, response, reward, g, engine_logprobs=logprobs, response_mask=mask))
    return out


@pytest.mark.parametrize(
    "name,extra",
    [
        ("real", {}),
        ("real_no_anchor", {}),
        ("real_bce", {}),
        ("grpo", {}),
        ("dapo", {}),
        ("gspo", {}),
        ("real", {"importance_correction": "tis", "importance_unit": "token"}),
        ("real", {"kl": "old", "kl_coef": 0.1}),
    ],
)
def test_non_model_tokens_get_exactly_zero_gradient_and_the_score_is_the_mean_over_model_tokens(name, extra):
    rollouts = masked_rollouts()
    (mini,) = build_mini_batches(rollouts, 4, 4, 1, 0, packed=True)
    (mb,) = mini.micro_batches
    assert mb.loss_mask is not None and int(mb.loss_mask.sum()) == mini.num_tokens
    assert mini.num_tokens == sum(sum(r.response_mask) for r in rollouts)
    gen = torch.Generator().manual_seed(1)
    old = (-torch.rand(mb.targets.numel(), generator=gen, dtype=torch.float64)).float()
    logprobs = (old + 0.3 * torch.randn(old.shape, generator=gen)).requires_grad_()
    batch = PolicyBatch(
        logprobs=logprobs,
        old_logprobs=old,
        loss_mask=mb.loss_mask,
        seq_index=mb.seq_index,
        rewards=mb.rewards,
        group_ids=mb.group_index,
        advantages=mb.advantages,
        num_groups=mb.num_groups,
        engine_logprobs=mb.engine_logprobs,
        ref_logprobs=old,
        active=mb.active,
    )
    objective = build_objective(name, **extra)
    terms = objective(batch)
    total = sum(v for v in terms.values() if isinstance(v, torch.Tensor) and v.requires_grad)
    total.backward()
    grad = logprobs.grad
    assert (grad[~mb.loss_mask] == 0).all()  # exactly zero, not small
    assert (grad[mb.loss_mask] != 0).any()
    # s̄ per rollout: the mean over its model tokens, against a float64 reference
    from real_megatron.objectives.real import sequence_scores

    scores = sequence_scores(logprobs.detach(), old, mb.loss_mask, mb.seq_index, mb.rewards.numel())
    for b, i in enumerate(mb.rollout_ids):
        m = torch.tensor(rollouts[i].response_mask)
        rows = (mb.seq_index == b).nonzero().squeeze(1)
        diff = (logprobs.detach()[rows].double() - old[rows].double())[m]
        assert abs(float(scores[b]) - float(diff.mean())) <= 1e-6


def test_single_turn_micro_batches_carry_no_mask():
    rollouts = masked_rollouts()
    for r in rollouts:
        r.response_mask = None
    (mini,) = build_mini_batches(rollouts, 4, 4, 1, 0, packed=True)
    assert mini.micro_batches[0].loss_mask is None
    assert mini.num_tokens == sum(len(r.response_ids) for r in rollouts)
    all_true = masked_rollouts()
    for r in all_true:
        r.response_mask = [True] * len(r.response_ids)
    assert build_mini_batches(all_true, 4, 4, 1, 0, packed=True)[0].micro_batches[0].loss_mask is None


def test_routed_experts_of_a_trajectory_come_from_the_call_that_fed_each_token(tok):
    from real_megatron.agents.trajectory import Trajectory

    traj = Trajectory([1, 2, 3])
    # turn 1: context 3, 2 sampled -> that call fed rows 0..3 (4 rows); glue of 2; turn 2: context 7, 3 sampled
    traj.add_model_turn([4, 5], None, "a", 0)
    traj.routed.append((3, 2, torch.full((4, 1, 1), 1)))
    traj.add_between([6, 7], [])
    traj.routed.append((7, 3, torch.full((9, 1, 1), 2)))
    traj.add_model_turn([8, 9, 10], None, "b", 0)
    experts = routed_experts_of(traj)
    assert experts.shape[0] == len(traj.context) - 1 == 9
    assert experts[:4].flatten().tolist() == [1] * 4 and experts[4:].flatten().tolist() == [2] * 5


def test_step_metrics_of_trajectories(tok):
    rollouts = masked_rollouts()[:4]
    for k, r in enumerate(rollouts):
        r.turns = [{"role": "user", "content": "q"}]
        r.stats = {"turns": k + 1, "tool_calls": k, "finish": ["done", "turns", "tokens", "done"][k]}
    m = trajectory_metrics(rollouts)
    assert m["turns_mean"] == 2.5 and m["tool_calls_mean"] == 1.5
    assert m["truncated_turns_ratio"] == 0.25 and m["truncated_tokens_ratio"] == 0.25
    assert trajectory_metrics(masked_rollouts()) == {}


def test_rollout_log_shows_the_turns_with_their_roles(tmp_path, tok):
    from real_megatron.metrics import RolloutLog

    r = masked_rollouts()[0]
    r.turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    r.stats = {"finish": "done"}
    log = RolloutLog(tmp_path, tok, -1)
    log.log(1, [r])
    log.close()
    row = json.loads((tmp_path / "rollouts.jsonl").read_text())
    assert [t["role"] for t in row["turns"]] == ["user", "assistant"] and row["model_tokens"] == sum(r.response_mask)


def test_the_embedded_engine_trains_the_ids_it_sampled(tok):
    """A real LocalEngine (tiny random Qwen2) through the rollout loop: the batch builder's targets
    at the model's tokens are the engine's sampled ids, its log-probs at them the engine's."""
    from tiny_models import tiny_qwen2

    from real_megatron.rollout.local import LocalEngine

    model = tiny_qwen2(96, layers=2, heads=4, kv_heads=2, tie_word_embeddings=True)

    class Recording(LocalEngine):
        sampled: list = []

        def generate(self, prompts, n, params):
            groups = super().generate(prompts, n, params)
            self.sampled += [s.output_ids for g in groups for s in g]
            return groups

    engine = Recording(model.config, pad_token_id=tok.pad_token_id)
    engine.update_weights(model.state_dict().items(), version=1)
    # the random model stops on any digit too (rollout.stop_token_ids), so its turns end early
    stops = stop_ids(tok) + tuple(tok.convert_tokens_to_ids(list("0123456789")))
    run = TrajectoryRunner(lambda: CountingEnv(turns=3), tok, stops, TurnLimits(3, 400, 24))
    example = {"prompt": PROMPT, "ground_truth": "1", "data_source": "", "extra_info": {}}
    params = SamplingParams(temperature=1.0, max_new_tokens=300, stop_token_ids=stops, seed=3)
    groups = run.run(engine, [example] * 4, 2, params)
    trajectories = [t for g in groups for t in g]
    assert max(t.model_turns for t in trajectories) >= 2
    rollouts = [
        Rollout(t.prompt_ids, t.ids, float(k % 2), k // 2, t.logprobs, response_mask=t.mask)
        for k, t in enumerate(trajectories)
    ]
    (mini,) = build_mini_batches(rollouts, 4, 4, 1, 0, packed=True)
    (mb,) = mini.micro_batches
    mask = mb.loss_mask if mb.loss_mask is not None else torch.ones_like(mb.targets, dtype=torch.bool)
    trained = [mb.targets[(mb.seq_index == b) & mask].tolist() for b in range(len(rollouts))]
    for t, ids in zip(trajectories, trained):
        turns, pos = [], 0  # the model's turns of this trajectory, in order, among everything the engine sampled
        for sample in engine.sampled:
            if ids[pos : pos + len(sample)] == sample:
                turns.append(sample)
                pos += len(sample)
        assert pos == len(ids) == sum(t.mask)
    # the engine's log-probs ride along at the model's tokens
    flat = torch.tensor([x for r in rollouts for x in r.engine_logprobs])
    assert torch.equal(mb.engine_logprobs, flat)


def test_rollout_tools_run_the_tool_environment_through_the_rollout_loop(tok):
    """`rollout.tools: [python]` alone: the tool environment with the python tool, its call run in
    the sandbox, its result a tool turn between the model's (not trained on), its counts per trajectory."""
    from types import SimpleNamespace

    settings = SimpleNamespace(environment=None, environment_args={}, tools=["python"])
    spec, args = environment_spec(settings)
    make = load_environment_factory(spec, args, "rollout.tools")
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(12*34)"}}</tool_call>'
    engine = ScriptedEngine(tok, [call, "It is 408."])
    example = {"prompt": PROMPT, "ground_truth": "408", "data_source": "", "extra_info": {}}
    (traj,) = runner(tok, make).run(engine, [example], 1, SamplingParams())[0]
    assert traj.finish == "done" and traj.model_turns == 2
    assert [t["role"] for t in traj.turns] == ["user", "assistant", "tool", "assistant"]
    assert traj.turns[2]["content"].strip() == "408"
    assert traj.stats["tool_calls"] == 1 and traj.stats["tool_errors"] == 0
    between = [t for t, m in zip(traj.ids, traj.mask) if not m]
    assert "<tool_response>\n408" in tok.decode(between)


def test_the_mismatch_metrics_count_the_model_tokens_only():
    from real_megatron.objectives.importance import mismatch_partials

    old = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    engine = torch.tensor([-1.5, 0.0, -3.0, -4.5])  # position 1: a between-turn token (engine 0.0)
    mask = torch.tensor([True, False, True, True])
    masked = mismatch_partials(old, engine, 0.1, mask)
    assert masked.tolist()[0] == 1.0 and masked.tolist()[4] == 3  # sum |d| over 3 model tokens
    assert torch.equal(masked, mismatch_partials(old[mask], engine[mask], 0.1))
