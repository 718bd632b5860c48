"""Prompt data from the real verl parquet files and from jsonl; errors name file and row."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from real_megatron.data import DataError, PromptDataset, load_examples
from shared_data import BENCHMARKS, data_file


def tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the answer is boxed think step by step"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
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
    counts = {name: len(load_examples(data_file(name))[0]) for name in ("aime", "amc", "math", "minerva", "olympiad_bench")}
    assert counts == {"aime": 30, "amc": 83, "math": 500, "minerva": 272, "olympiad_bench": 675}


def test_jsonl_and_malformed_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "what is 1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    examples, _ = load_examples(good)
    assert [e.ground_truth for e in examples] == ["2", 4] and examples[1].messages[0]["content"] == "2+2?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n{not json\n" + json.dumps({"prompt": "no answer"}) + "\n")
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
