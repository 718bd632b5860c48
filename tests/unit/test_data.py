"""Prompt data from the real verl parquet files and from jsonl; errors name file and row."""

import json

import pytest
from shared_data import BENCHMARKS, data_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from real_megatron.data import DataError, PromptDataset, load_examples


def tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the answer is boxed think step by step"], trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
    return fast


@pytest.mark.parametrize("name", BENCHMARKS + ["dapo-math-17k"])
def test_every_row_of_the_real_files_loads(name):
    examples, skipped = load_examples(data_file(name))
    assert skipped == 0 and len(examples) > 0
    for ex in examples:
        assert ex.messages and ex.messages[-1]["role"] == "user" and ex.messages[-1]["content"]
        assert ex.ground_truth not in (None, "")


def test_row_counts_match_the_data_card():
    counts = {
        name: len(load_examples(data_file(name))[0]) for name in ("aime", "amc", "math", "minerva", "olympiad_bench")
    }
    assert counts == {"aime": 30, "amc": 83, "math": 500, "minerva": 272, "olympiad_bench": 675}


def test_jsonl_and_malformed_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "what is 1+1?", "answer": "2"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "answer": 4})
        + "\n"
    )
    examples, _ = load_examples(good)
    assert [e.ground_truth for e in examples] == ["2", 4] and examples[1].messages[0]["content"] == "2+2?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "ok", "answer": "1"}) + "\n{not json\n" + json.dumps({"prompt": "no answer"}) + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: not valid JSON"):
        load_examples(bad)
    examples, skipped = load_examples(bad, skip_malformed=True)
    assert len(examples) == 1 and skipped == 2
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        load_examples(csv)


def test_dataset_order_is_deterministic_and_resumes(tmp_path):
    tok = tokenizer()
    files = [data_file("aime"), data_file("amc")]
    a = PromptDataset(files, tok, max_prompt_tokens=10_000, seed=3)
    first = [e.source for e in a.next_batch(50)]
    state = a.state_dict()
    rest = [e.source for e in a.next_batch(100)]  # crosses into epoch 1 (113 prompts)
    b = PromptDataset(files, tok, max_prompt_tokens=10_000, seed=3)
    assert [e.source for e in b.next_batch(50)] == first
    c = PromptDataset(files, tok, max_prompt_tokens=10_000, seed=3)
    c.load_state_dict(state)
    assert [e.source for e in c.next_batch(100)] == rest
    assert sorted(first + rest[:63]) == sorted(e.source for e in a.examples)  # one epoch = every prompt once
    d = PromptDataset(files, tok, max_prompt_tokens=10_000, seed=4)
    assert [e.source for e in d.next_batch(50)] != first
    short = PromptDataset(files, tok, max_prompt_tokens=60)
    assert short.dropped_long > 0 and len(short) + short.dropped_long == 113
    assert all(len(e.prompt_ids) <= 60 for e in short.examples)


def test_bad_inputs_name_the_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [{"role": "user", "content": "1+1?"}]
    rows = [
        {"prompt": msgs, "reward_model": {"ground_truth": "2"}, "data_source": "x"},
        {"prompt": msgs, "reward_model": {"ground_truth": None}, "data_source": "x"},  # no ground truth
        {"prompt": msgs, "reward_model": {"ground_truth": ""}, "data_source": "x"},  # empty ground truth
        {"prompt": msgs, "reward_model": {"ground_truth": "4"}, "data_source": "x"},
    ]
    verl = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), verl)
    with pytest.raises(DataError, match=r"verl.parquet: row 1: no usable ground truth at 'reward_model.ground_truth'"):
        load_examples(verl)
    examples, skipped = load_examples(verl, skip_malformed=True)
    assert [e.ground_truth for e in examples] == ["2", "4"] and skipped == 2
    assert [e.source for e in examples] == [f"{verl}:0", f"{verl}:3"]  # the good rows keep their numbers

    numeric = tmp_path / "numeric_prompt.jsonl"
    numeric.write_text(
        json.dumps({"prompt": "ok", "answer": "1"})
        + "\n"
        + json.dumps({"prompt": 42, "answer": "1"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": 7}], "answer": "1"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"numeric_prompt.jsonl: row 1: prompt must be a string or a list"):
        load_examples(numeric)
    assert load_examples(numeric, skip_malformed=True)[1] == 2

    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(
        json.dumps({"prompt": "ok", "answer": "1"}).encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n'
    )
    with pytest.raises(DataError, match=r"latin1.jsonl: row 1: not UTF-8"):
        load_examples(latin)
    assert len(load_examples(latin, skip_malformed=True)[0]) == 1

    empty_jsonl, empty_parquet = tmp_path / "empty.jsonl", tmp_path / "empty.parquet"
    empty_jsonl.write_text("\n\n")
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), empty_parquet)
    for empty in (empty_jsonl, empty_parquet):
        with pytest.raises(DataError, match=f"{empty.name}: the file holds no rows"):
            load_examples(empty, skip_malformed=True)

    folder = tmp_path / "train.parquet"  # a directory, even one named like a file
    folder.mkdir()
    with pytest.raises(DataError, match=r"train.parquet: is a directory"):
        load_examples(folder)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"corrupt.parquet: not a readable parquet file"):
        load_examples(corrupt)
    with pytest.raises(DataError, match=r"data file not found: .*missing.jsonl"):
        load_examples(tmp_path / "missing.jsonl")
