"""The tool quickstart's task (real_megatron/tasks/tool_products.py): deterministic disjoint splits,
a chat template that is append-only by ids, and warm-start traces assembled as rollouts assemble
trajectories, with the loss on the model's turns only."""

from real_megatron.tasks import tool_products as task


def test_the_splits_are_deterministic_and_disjoint():
    a, b = task.split(300, 50, seed=3, n_dev=40), task.split(300, 50, seed=3, n_dev=40)
    assert a == b
    prompts = [{p for p, _, _ in part} for part in a]
    assert sum(map(len, prompts)) == 390 and len(set.union(*prompts)) == 390
    for prompt, call, answer in a[0][:20]:
        x, y = map(int, prompt[:-1].split("*"))
        assert answer == x * y and f'"code":"{x}*{y}"' in call and 10 <= x <= 99 and 10 <= y <= 999
    share = sum(task.direct(p) for p, _, _ in a[0]) / len(a[0])
    assert abs(share - task.DIRECT_PERCENT / 100) < 0.08


def test_traces_train_on_the_models_turns_and_the_glue_is_the_rollouts(tmp_path):
    from real_megatron.agents.tool_calls import parse_tool_calls

    train, _, _ = task.split(500, 0, seed=1)
    tok = task.build_tokenizer(tmp_path, task.corpus(train), 160)
    encode = task.TraceEncoder(tok)  # checks the template is append-only (raises if not)
    tool = next(item for item in train if not task.direct(item[0]))
    ids, labels = encode(tool)
    text = tok.decode(ids)
    assert text == f"{tool[0]}{tool[1]}<eos>[{tool[2]}]\\boxed{{{tool[2]}}}<eos>"
    trained = tok.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == f"{tool[1]}<eos>\\boxed{{{tool[2]}}}<eos>"  # not the prompt, not the tool's result
    (call,) = parse_tool_calls(tool[1])
    assert call.name == "python" and call.arguments == {"code": tool[0][:-1]}
    direct = next(item for item in train if task.direct(item[0]))
    ids, labels = encode(direct)
    assert tok.decode(ids) == f"{direct[0]}\\boxed{{{direct[2]}}}<eos>"
