"""Tools: calls read from Qwen-format replies (malformed ones answered, never raised), schemas from
signatures and docstrings, the tool environment by import path with tools of a user module (plain,
async, failing, slow, too many), the python tool through it, and the docs' environment."""

import json
import re
import time
from pathlib import Path

import pytest

from real_megatron.agents.environment import EnvironmentHandle, environment_spec, load_environment_factory
from real_megatron.agents.tool_calls import parse_tool_calls
from real_megatron.agents.tools import PYTHON_SCHEMA, function_schema, load_tools
from real_megatron.config import Config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def call(name, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_tool_calls_are_read_and_malformed_ones_say_why():
    reply = "Let me compute.\n" + call("python", code="print(1)") + "\n" + call("lookup", word="x") + "<|im_end|>"
    calls = parse_tool_calls(reply)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("python", {"code": "print(1)"}, None),
        ("lookup", {"word": "x"}, None),
    ]
    string_args = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert parse_tool_calls(string_args)[0].arguments == {"a": 1}
    assert parse_tool_calls("no call here") == []
    assert parse_tool_calls("<think>maybe " + call("python", code="1") + "</think>The answer is 3.") == []
    assert parse_tool_calls(call("python", code="1")[: -len("</tool_call>")])[0].error is None  # unclosed, complete
    bad = {
        "<tool_call>{'name': 'python'}</tool_call>": "not valid JSON",
        "<tool_call>[1, 2]</tool_call>": "JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': "names no tool",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>': "not a JSON object",
        '<tool_call>{"name": "f", "argum': "no closing </tool_call>",
    }
    for text, why in bad.items():
        (parsed,) = parse_tool_calls(text)
        assert parsed.error and why in parsed.error, (text, parsed.error)


def test_schema_from_signature_and_docstring():
    tools = load_tools(["python", "agent_tools:lookup", "agent_tools:wait"])
    assert tools["python"].schema == PYTHON_SCHEMA and tools["python"].builtin
    fn = tools["lookup"].schema["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Looks a word up in the dictionary."
    assert fn["parameters"] == {
        "type": "object",
        "properties": {
            "word": {"type": "string", "description": "the word to look up"},
            "limit": {"type": "integer", "description": "how many senses to return, at most", "default": 1},
            "style": {
                "enum": ["short", "long"],
                "type": "string",
                "description": "how much to say",
                "default": "short",
            },
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "description": "labels to filter by",
                "default": None,
            },
        },
        "required": ["word"],
    }
    wait = tools["wait"].schema["function"]
    assert wait["description"] == "Sleeps, then says how long."
    assert wait["parameters"]["properties"] == {"seconds": {"type": "number", "description": "how long to sleep"}}
    with pytest.raises(ValueError, match=r"rollout.tools: 'agent_tools:splat': tool splat: \*values"):
        load_tools(["agent_tools:splat"])
    with pytest.raises(ValueError, match="'agent_tools:nope': 'agent_tools' has no function 'nope'"):
        load_tools(["agent_tools:nope"])
    with pytest.raises(ValueError, match="neither 'python' nor of the form module.path:function"):
        load_tools(["calculator"])
    with pytest.raises(ValueError, match="two tools are named 'lookup'"):
        load_tools(["agent_tools:lookup", "agent_tools:lookup"])

    def typed(n: int, xs: dict, flag: bool = False) -> None:
        """One line.

        :param n: a count
        """

    schema = function_schema(typed)["function"]["parameters"]
    assert schema["properties"]["n"] == {"type": "integer", "description": "a count"}
    assert schema["properties"]["xs"] == {"type": "object"} and schema["required"] == ["n", "xs"]


def tool_environment(**overrides):
    """The tool environment as a run builds it: the rollout section -> import path -> one per trajectory."""
    rollout = Config().rollout
    rollout.tools = ["python", "agent_tools:lookup", "agent_tools:wait"]
    for key, value in overrides.items():
        setattr(rollout, key, value)
    spec, args = environment_spec(rollout)
    assert spec == "real_megatron.agents.tool_env:ToolEnvironment" and args == {
        "tools": rollout.tools,
        **rollout.tool_settings(),
    }
    return EnvironmentHandle(load_environment_factory(spec, args)())


def test_the_tool_environment_answers_every_call_and_never_raises():
    env = tool_environment(tool_timeout_s=0.5, tool_max_calls_per_turn=5)
    try:
        first = env.reset({"prompt": [{"role": "user", "content": "hi"}], "ground_truth": "1"})
        assert first == [{"role": "user", "content": "hi"}]
        assert [t["function"]["name"] for t in env.tools()] == ["python", "lookup", "wait"]
        reply = "".join(
            [
                call("lookup", word="sandbox"),
                call("lookup", word="castle"),  # the tool raises
                call("lookup", wrd="sandbox"),  # bad arguments
                call("search", q="x"),  # no such tool
                '<tool_call>{"name": "lookup", </tool_call>',  # malformed
            ]
        )
        out = env.step(reply)
        assert not out.done and out.reward is None
        texts = [m["content"] for m in out.messages]
        assert all(m["role"] == "tool" for m in out.messages) and len(texts) == 5
        assert texts[0] == "a box of sand; a place where code cannot harm its host"
        assert texts[1] == "Error: lookup raised KeyError: \"no entry for 'castle'\""
        assert texts[2] == "Error: lookup has no argument 'wrd' (its arguments: word, limit, style, tags)"
        assert texts[3] == "Error: there is no tool 'search'; the tools are python, lookup, wait"
        assert "not valid JSON" in texts[4] and texts[4].startswith("Error: ")
        assert env.env.stats == {"tool_calls": 5, "tool_errors": 4, "sandbox_timeouts": 0}

        start = time.monotonic()  # calls of one turn run concurrently, each with its deadline
        out = env.step(call("wait", seconds=0.3) + call("wait", seconds=0.3) + call("wait", seconds=5))
        elapsed = time.monotonic() - start
        assert [m["content"] for m in out.messages] == [
            '{"slept": 0.3}',
            '{"slept": 0.3}',
            "Error: wait did not answer within 0.5 s",
        ]
        assert elapsed < 0.9, elapsed
        out = env.step("".join(call("wait", seconds=0) for _ in range(6)))
        assert [m["content"] for m in out.messages][-2:] == [
            '{"slept": 0}',
            "Error: at most 5 tool calls per turn: this one was not run",
        ]
        out = env.step("The answer is \\boxed{3}.")  # no call: the end, labelled by the verifier
        assert out.done and out.messages == [] and out.reward is None
        assert env.env.stats == {"tool_calls": 14, "tool_errors": 6, "sandbox_timeouts": 0}
    finally:
        env.close()


def test_python_tool_through_the_environment_keeps_state_and_cuts_output():
    env = tool_environment(tool_max_result_chars=50, sandbox_cpu_s=1.0, tool_timeout_s=5.0)
    try:
        env.reset({"prompt": "What is 2**100 mod 7?"})
        out = env.step(call("python", code="x = 2**100 % 7") + call("python", code="x"))
        assert [m["content"] for m in out.messages] == ["(no output: print what you want to see)", "2\n"]
        out = env.step(call("python", code="print('y' * 1000)") + call("python", code="1/0") + call("python", cmd="1"))
        texts = [m["content"] for m in out.messages]
        assert texts[0] == "y" * 25 + "\n... (951 characters cut) ...\n" + "y" * 24 + "\n"
        assert texts[1].endswith("Error: division by zero\n")
        assert texts[2].startswith('Error: python takes one argument, "code"')
        out = env.step(call("python", code="while True: pass"))
        assert "CPU time limit" in out.messages[0]["content"]
        assert env.env.stats == {"tool_calls": 6, "tool_errors": 3, "sandbox_timeouts": 1}
    finally:
        env.close()
    assert env.env.sandbox is None


def test_the_docs_environment_runs_as_written():
    """docs/agents.md's complete environment (under 40 lines), plugged in by import path."""
    text = DOCS.read_text()
    code = re.search(r"<!-- environment -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) < 40
    import sys
    import types

    module = types.ModuleType("docs_environment")
    exec(compile(code, str(DOCS), "exec"), module.__dict__)
    sys.modules["docs_environment"] = module
    try:
        make = load_environment_factory("docs_environment:GuessNumber", {"low": 1, "high": 9})
        env = EnvironmentHandle(make())
        messages = env.reset({"prompt": "", "ground_truth": "7", "data_source": "guess", "extra_info": {}})
        assert messages[0]["role"] == "user" and "1 and 9" in messages[0]["content"]
        out = env.step("Is it 5?")
        assert (out.messages, out.done, out.reward) == ([{"role": "user", "content": "Higher."}], False, None)
        out = env.step("Then 7.")
        assert out.done and out.reward == 1.0 and out.messages == []
        env.reset({"prompt": "", "ground_truth": "2", "data_source": "guess", "extra_info": {}})
        results = [env.step("9") for _ in range(6)]
        assert [r.done for r in results] == [False] * 5 + [True] and results[-1].reward == 0.0
        env.close()
    finally:
        del sys.modules["docs_environment"]
