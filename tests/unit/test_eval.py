"""`real-megatron eval` on the real benchmark files (../shared/data) with a tiny random model.

The scores of a random model are ~0; what is checked is the protocol: every row of every file is
evaluated k times, per-benchmark pass@1 and the average are consistent, the Table 1 row and the
JSON report are written, and responses known to be correct score 1 through the same pipeline.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from shared_data import BENCHMARKS, data_file
from tiny_models import tiny_qwen2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from real_megatron.data import load_examples
from real_megatron.evaluation import evaluate_sets, pass_at_1, table_rows
from real_megatron.rewards import math_reward
from real_megatron.rollout.types import Sample, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"aime": 30, "amc": 83, "math": 500, "minerva": 272, "olympiad_bench": 675}


def byte_tokenizer(path: Path, corpus: list[str]) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE: decode(encode(text)) == text, so scripted responses survive the round trip."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    corpus = [ex.messages[-1]["content"] for ex in load_examples(data_file("math"))[0][:200]]
    tokenizer = byte_tokenizer(path, corpus + ["\\boxed{12}", "The answer is \\boxed{x^2}"])
    tiny_qwen2(len(tokenizer), positions=4096, eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    return path, tokenizer


def test_eval_cli_covers_every_row_and_writes_the_table_and_json(tiny_model, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "eval",
        "--model",
        str(model),
        "--data",
        *[str(data_file(name)) for name in BENCHMARKS],
        "--k",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["k"] == 2 and list(report["benchmarks"]) == BENCHMARKS
    for name, rows in ROWS.items():
        b = report["benchmarks"][name]
        assert (b["problems"], b["samples"]) == (rows, 2 * rows), name
        assert 0.0 <= b["pass1"] <= 1.0 and b["truncated_ratio"] >= 0.0
    assert report["problems"] == sum(ROWS.values()) and report["samples"] == 2 * sum(ROWS.values())
    assert report["average"] == pytest.approx(sum(b["pass1"] for b in report["benchmarks"].values()) / 5)
    header = "| Model | " + " | ".join(BENCHMARKS) + " | Avg. |"
    assert header in proc.stdout and f"| {model.name} | " in proc.stdout
    assert f"wrote {out}" in proc.stdout


def test_eval_cli_names_a_bad_input(tiny_model, tmp_path, capsys):
    """A bad row, a model directory without config.json: one line each (the kind, the file and row,
    the fix), exit 2, no traceback; in-process, as `real-megatron eval` runs it."""
    from real_megatron.cli import main

    model, _ = tiny_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    assert main(["eval", "--model", str(model), "--data", str(bad), "--answer-key", "answer"]) == 2
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if "error" in text]
    assert line.startswith(f"data error: {bad}: row 1: no 'prompt' or 'messages' field") and "Traceback" not in err
    assert "data.skip_malformed=true" in line and "(traceback: " in line
    assert main(["eval", "--model", str(tmp_path), "--data", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"config error: eval: --model {tmp_path} is not an HF checkpoint")


@pytest.mark.parametrize(
    "reward_fn,says",
    [
        ("reward_fns:raises", "reward function reward_fns:raises raised on {data}:0: KeyError: 'no such test case'"),
        ("reward_fns:half", "reward function reward_fns:half returned 0.5 on {data}:0: REAL's rewards are"),
    ],
)
def test_a_failing_reward_function_is_one_line_in_eval_as_in_train(tiny_model, tmp_path, capsys, reward_fn, says):
    """The same RewardError, said the same way, as `train` says it (tests/integration/test_train_loop.py):
    a function that raises, one that returns what is not a 0/1 label."""
    from real_megatron.cli import main

    model, _ = tiny_model
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(model), "--data", str(data), "--answer-key", "answer", "--k", "1"]
    argv += ["--max-new-tokens", "2", "--reward-fn", reward_fn, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err  # the progress lines, then the error's
    (line,) = [text for text in err.splitlines() if "error" in text]
    assert line.startswith("reward error: " + says.format(data=data)) and "Traceback" not in err, err
    assert line.endswith(f"(traceback: {tmp_path / 'traceback.rank0.txt'})")
    assert "Traceback" in (tmp_path / "traceback.rank0.txt").read_text() and not out.exists()


class ScriptedEngine:
    """Generation replaced by known responses (the engines are tested in their own files): sample j
    of problem i answers correctly when correct(i, j)."""

    def __init__(self, tokenizer, examples, correct):
        self.tokenizer, self.examples, self.correct = tokenizer, examples, correct

    def generate(self, prompts, n, params):
        out = []
        for i, ex in enumerate(self.examples):
            truth = ex.ground_truth[0] if isinstance(ex.ground_truth, list) else ex.ground_truth
            group = []
            for j in range(n):
                text = f"so the answer is \\boxed{{{truth}}}" if self.correct(i, j) else "I do not know \\boxed{}"
                group.append(Sample(i, j, self.tokenizer.encode(text) + [self.tokenizer.eos_token_id], None, "stop"))
            out.append(group)
        return out


@pytest.mark.parametrize("name", ["aime", "amc", "minerva"])
def test_known_correct_responses_score_one_and_partial_credit_averages(tiny_model, name):
    _, tokenizer = tiny_model
    examples = load_examples(data_file(name))[0]
    for ex in examples:
        from real_megatron.data import render_prompt

        ex.prompt_ids = render_prompt(tokenizer, ex.messages)
    params = SamplingParams(temperature=0.6, top_p=1.0, max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
    all_right = evaluate_sets(
        ScriptedEngine(tokenizer, examples, lambda i, j: True), tokenizer, {name: examples}, math_reward, 4, params
    )
    assert all_right["benchmarks"][name]["pass1"] >= 0.99  # the verifier's documented coverage of the truths
    # problem i gets (i mod 5) of 4 samples right: pass@1 is the mean of (i mod 5) / 4 over solvable truths
    k = 4
    partial = evaluate_sets(
        ScriptedEngine(tokenizer, examples, lambda i, j: j < i % 5), tokenizer, {name: examples}, math_reward, k, params
    )
    expected, _ = pass_at_1([min(i % 5, k) / k for i in range(len(examples))])
    assert partial["benchmarks"][name]["pass1"] == pytest.approx(expected, abs=0.01)
    assert partial["benchmarks"][name]["samples"] == k * len(examples)


def test_table_rows_are_the_papers_layout():
    report = {"benchmarks": {"aime": {"pass1": 0.2876}, "math": {"pass1": 0.8}}, "average": 0.54375}
    assert table_rows({"REAL-1.5B": report}).splitlines() == [
        "| Model | aime | math | Avg. |",
        "|---|---|---|---|",
        "| REAL-1.5B | 28.8 | 80.0 | 54.4 |",
    ]


def test_eval_reads_a_run_directory_and_flags_override_its_tree(tiny_model, tmp_path):
    """--run DIR: k, lengths, temperature, data files, prompt/answer keys, reward function and the
    verifier's timeout come from DIR/config.yaml (as training's evaluation used them), the model from
    DIR/final_hf; a flag, or an a.b=c override of the tree, wins."""
    from real_megatron.config import load_config, save_config

    model, _ = tiny_model
    run = tmp_path / "run"
    (run / "final_hf").mkdir(parents=True)
    for f in model.iterdir():
        (run / "final_hf" / f.name).symlink_to(f)
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            f"eval.files=[{data_file('aime')}, {data_file('amc')}]",
            "eval.k=3",
            "eval.max_new_tokens=5",
            "eval.temperature=0.9",
            "data.verifier_timeout_s=7",
            "data.max_prompt_tokens=4096",
            "train.seed=5",
        ],
    )
    save_config(cfg, run / "config.yaml")

    def evaluate(*extra):
        out = tmp_path / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "real_megatron.cli", "eval", "--run", str(run), "--out", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    report = evaluate()
    assert (report["k"], report["max_new_tokens"], report["temperature"], report["seed"]) == (3, 5, 0.9, 5)
    assert (report["verifier_timeout_s"], report["max_prompt_tokens"]) == (7.0, 4096)
    assert report["model"] == str(run / "final_hf") and report["settings_from"] == str(run / "config.yaml")
    assert list(report["benchmarks"]) == ["aime", "amc"] and report["samples"] == 3 * (30 + 83)
    report = evaluate("--k", "1", "--data", str(data_file("aime")), "eval.temperature=0.5")
    assert (report["k"], report["temperature"], report["samples"]) == (1, 0.5, 30)


def test_eval_without_a_model_or_with_both_sources_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "real_megatron.cli", "eval", "--data", "x.parquet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "eval: no --model" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "real_megatron.cli",
            "eval",
            "--run",
            str(tmp_path),
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not both" in proc.stderr, proc.stderr[-2000:]
