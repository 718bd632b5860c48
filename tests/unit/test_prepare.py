"""`real-megatron prepare` offline: sample files in the published formats (DeepScaleR's JSON list,
the benchmarks' parquet and jsonl) become the verl parquet the Table 1 config reads, row counts
checked; what cannot be fetched is named with where it comes from and where it goes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from real_megatron.data import load_examples
from real_megatron.prepare import DATASETS, INSTRUCTION

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1")  # no network attempt: the machine has none


def prepare(cwd, *extra):
    return subprocess.run(
        [sys.executable, "-m", "real_megatron.cli", "prepare", str(CONFIG), *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=OFFLINE,
    )


def write_published_samples(root: Path, short: str | None = None) -> None:
    """Each source in its published shape, with the paper's row count (one fewer for `short`)."""

    def n(name):
        return DATASETS[name].rows - (name == short)

    raw = root / "data" / "deepscaler" / "raw" / "deepscaler"
    raw.mkdir(parents=True)
    (raw / "deepscaler.json").write_text(
        json.dumps(
            [
                {"problem": f"What is {i} + 1?", "answer": str(i + 1), "solution": "..."}
                for i in range(n("deepscaler/train.parquet"))
            ]
        )
    )
    bench = root / "data" / "raw"
    for name, table in {
        "aime": {
            "id": list(range(n("aime.parquet"))),
            "problem": [f"AIME {i}" for i in range(n("aime.parquet"))],
            "solution": ["..."] * n("aime.parquet"),
            "answer": [str(i) for i in range(n("aime.parquet"))],
            "url": ["u"] * n("aime.parquet"),
            "year": ["2024"] * n("aime.parquet"),
        },
        "amc": {
            "id": list(range(n("amc.parquet"))),
            "problem": [f"AMC {i}" for i in range(n("amc.parquet"))],
            "answer": [float(i) for i in range(n("amc.parquet"))],
            "url": ["u"] * n("amc.parquet"),
        },
        "olympiad_bench": {
            "question": [f"Olympiad {i}" for i in range(n("olympiad_bench.parquet"))],
            "final_answer": [[f"$x={i}$"] for i in range(n("olympiad_bench.parquet"))],
        },
    }.items():
        (bench / name / "data").mkdir(parents=True)
        pq.write_table(pa.table(table), bench / name / "data" / "test-00000-of-00001.parquet")
    (bench / "math").mkdir()
    (bench / "math" / "test.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "problem": f"MATH {i}",
                    "solution": "...",
                    "answer": f"\\frac{{{i}}}{{2}}",
                    "subject": "Algebra",
                    "level": 1,
                    "unique_id": f"test/{i}.json",
                }
            )
            + "\n"
            for i in range(n("math.parquet"))
        )
    )
    (bench / "minerva").mkdir()
    (bench / "minerva" / "test.jsonl").write_text(
        "".join(json.dumps({"question": f"Minerva {i}", "answer": "9.6"}) + "\n" for i in range(n("minerva.parquet")))
    )


def test_offline_without_files_names_every_source_and_destination(tmp_path):
    proc = prepare(tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in err
    assert "checkpoints/hf/DeepSeek-R1-Distill-Qwen-1.5B" in err
    for target, source in DATASETS.items():
        if target != "dapo-math-17k.parquet":  # the DAPO-17K configs' training set, not this config's
            assert f"https://huggingface.co/datasets/{source.repo}" in err, target
    assert "data/deepscaler/raw/deepscaler/" in err and "data/raw/aime/" in err
    assert not list(tmp_path.rglob("*.parquet"))


def test_published_files_become_the_configs_verl_parquet_with_the_papers_counts(tmp_path):
    write_published_samples(tmp_path)
    proc = prepare(tmp_path, "--offline")
    assert proc.returncode == 2, proc.stderr  # the model still cannot be fetched offline
    assert "model.path checkpoints/hf/DeepSeek-R1-Distill-Qwen-1.5B" in proc.stderr
    assert "data.train_files" not in proc.stderr and "eval.files" not in proc.stderr, proc.stderr
    for target, source in DATASETS.items():
        if target == "dapo-math-17k.parquet":  # not this config's (its own test: below)
            continue
        path = tmp_path / "data" / target
        examples, skipped = load_examples(path)  # the trainer's own reader
        assert len(examples) == source.rows and skipped == 0, target
        assert examples[0].messages[-1]["content"].endswith(" " + INSTRUCTION), target
    train, _ = load_examples(tmp_path / "data" / "deepscaler" / "train.parquet")
    assert train[5].messages[-1]["content"] == f"What is 5 + 1? {INSTRUCTION}" and train[5].ground_truth == "6"
    olympiad, _ = load_examples(tmp_path / "data" / "olympiad_bench.parquet")
    assert olympiad[3].ground_truth == ["$x=3$"]
    amc, _ = load_examples(tmp_path / "data" / "amc.parquet")
    assert amc[7].ground_truth == "7.0"
    again = prepare(tmp_path, "--offline")  # present files are left alone
    assert "data/aime.parquet: present" in again.stdout


def test_a_file_with_the_wrong_row_count_is_refused_by_name(tmp_path):
    write_published_samples(tmp_path, short="minerva.parquet")
    proc = prepare(tmp_path, "--offline")
    assert proc.returncode == 2
    assert "data/minerva.parquet: 271 rows" in proc.stderr and "has 272" in proc.stderr, proc.stderr
    assert not (tmp_path / "data" / "minerva.parquet").exists() and (tmp_path / "data" / "math.parquet").exists()


def test_every_shipped_configs_model_and_data_have_a_known_source():
    """The table, offline: `prepare` knows where every shipped config's model and data files come from."""
    from real_megatron.config import load_config
    from real_megatron.prepare import MODELS, source_for

    configs = {p.name: load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))}
    names = {Path(c.model.path).name for c in configs.values() if c.task.name is None}
    assert names and names <= MODELS.keys(), names - MODELS.keys()
    unknown = {
        (name, path)
        for name, c in configs.items()
        if c.task.name is None
        for path in c.data.train_files + c.eval.files
        if source_for(Path(path)) is None
    }
    assert not unknown, unknown
    assert {"Qwen3-30B-A3B", "DeepSeek-R1-Distill-Qwen-1.5B"} <= names
    assert source_for(Path("data/dapo-math-17k.parquet")).repo == "BytedTsinghua-SIA/DAPO-Math-17k"


def test_dapo_math_17k_is_kept_once_per_problem_with_the_papers_instruction(tmp_path):
    """DAPO-Math-17k is published as verl rows, each problem 100 times inside DAPO's own "Answer:"
    instruction; prepare keeps each problem once (17,917), with the boxed instruction the verifier reads."""
    from real_megatron.prepare import convert

    source = DATASETS["dapo-math-17k.parquet"]
    before = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    )
    after = '\n\nRemember to put your answer on its own line after "Answer:".'
    n = source.rows
    table = pa.table(
        {
            "data_source": ["math_dapo"] * (2 * n),
            "prompt": [[{"content": f"{before}What is {i % n} + 1?{after}", "role": "user"}] for i in range(2 * n)],
            "ability": ["MATH"] * (2 * n),
            "reward_model": [{"ground_truth": str(i % n + 1), "style": "rule-lighteval/MATH_v2"} for i in range(2 * n)],
            "extra_info": [{"index": f"id-{i % n}"} for i in range(2 * n)],
        }
    )
    raw = tmp_path / "data" / "raw" / "dapo-math-17k" / "data"
    raw.mkdir(parents=True)
    pq.write_table(table, raw / "dapo-math-17k.parquet")
    target = tmp_path / "data" / "dapo-math-17k.parquet"
    assert convert(source, [raw / "dapo-math-17k.parquet"], target) == n
    examples, _ = load_examples(target)
    assert len(examples) == n
    assert examples[5].messages == [{"role": "user", "content": f"What is 5 + 1? {INSTRUCTION}"}]
    assert examples[5].ground_truth == "6" and examples[5].data_source == "dapo-math-17k"
