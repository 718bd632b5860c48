"""`real-megatron prepare CONFIG`: from a new machine to the files a config reads.

For every path a config names (model.path, data.train_files, eval.files) that is not there yet:
a model is downloaded from the Hugging Face Hub into model.path (a model.path that is a Hub id, into
Hugging Face's cache, where `train` finds it: hub.py); a data file is converted, from its
published source, into the verl parquet the trainer reads (prompt = one user message ending with
the paper's instruction, reward_model.ground_truth = the answer), and its row count is checked
against the paper's. Sources are fetched into RAW_DIR (next to the target: data/raw/aime/ for
data/aime.parquet) with huggingface_hub; files already there are converted without a download, so
a machine without internet works from files copied by hand. What cannot be fetched is listed at the
end with where to get it and where to put it, and the command exits 2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
MODELS = {  # model.path's directory name -> Hub repository
    "DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "DeepSeek-R1-Distill-Qwen-7B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
}


@dataclass(frozen=True)
class Source:
    repo: str  # Hub dataset repository
    rows: int  # the paper's row count (DeepScaleR's released splits; DAPO's unique problems)
    split: str  # extra_info.split
    question: tuple[str, ...] = ("problem", "question")  # the first column present holds the problem
    answer: tuple[str, ...] = ("answer", "final_answer")
    # "verl": published as verl rows already (prompt messages, reward_model.ground_truth), each
    # problem repeated (DAPO-Math-17k holds each of its 17,917 problems 100 times): kept once per
    # extra_info.index, the problem taken out of the publisher's instruction and given the paper's
    layout: str = "records"


# DAPO-Math-17k's instruction around each problem (its answers come as "Answer: ...", the verifier reads \boxed)
DAPO_BEFORE = re.compile(
    r"^\s*Solve the following math problem step by step\..*?where \$Answer is the answer to the problem\.\s*", re.S
)
DAPO_AFTER = re.compile(r'\s*Remember to put your answer on its own line after "Answer:"\.\s*$')


DATASETS = {  # the config's file (its last path parts) -> published source
    "deepscaler/train.parquet": Source("agentica-org/DeepScaleR-Preview-Dataset", 40315, "train"),
    "aime.parquet": Source("HuggingFaceH4/aime_2024", 30, "test"),
    "amc.parquet": Source("AI-MO/aimo-validation-amc", 83, "test"),
    "math.parquet": Source("HuggingFaceH4/MATH-500", 500, "test"),
    "minerva.parquet": Source("math-ai/minervamath", 272, "test"),
    "olympiad_bench.parquet": Source("math-ai/olympiadbench", 675, "test"),
    "dapo-math-17k.parquet": Source("BytedTsinghua-SIA/DAPO-Math-17k", 17917, "train", layout="verl"),
}
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


class PrepareError(RuntimeError):
    """What could not be made, each with where to get it and where to put it."""


def source_for(target: Path) -> Source | None:
    text = target.as_posix()
    return next((s for key, s in DATASETS.items() if text == key or text.endswith("/" + key)), None)


def raw_dir(target: Path) -> Path:
    """Where a target's published files go: data/raw/aime/ for data/aime.parquet."""
    return target.parent / "raw" / (target.parent.name if target.stem == "train" else target.stem)


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _verl_problems(records: list[dict], where: Path) -> list[dict]:
    """verl rows -> {problem, answer}, once per extra_info.index (or prompt), in their first order."""
    seen, out = set(), []
    for index, record in enumerate(records):
        try:
            text = record["prompt"][-1]["content"]
            answer = record["reward_model"]["ground_truth"]
        except (KeyError, IndexError, TypeError):
            raise PrepareError(
                f"{where}: record {index} is not a verl row (prompt messages, reward_model.ground_truth); "
                f"keys: {', '.join(record)}"
            ) from None
        key = (record.get("extra_info") or {}).get("index") or text
        if key in seen:
            continue
        seen.add(key)
        out.append({"problem": DAPO_AFTER.sub("", DAPO_BEFORE.sub("", text)).strip(), "answer": answer})
    return out


def _answer(value):
    """Ground truth as the verifier takes it: text, or a list of texts (any of them is right)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value)


def convert(source: Source, files: list[Path], target: Path) -> int:
    """The published records -> verl parquet at `target`; returns the row count (checked)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r for f in sorted(files) for r in _read_records(f)]
    if source.layout == "verl":
        records = _verl_problems(records, files[0])
    if len(records) != source.rows:
        raise PrepareError(
            f"{target}: {len(records)} rows in {', '.join(map(str, files))}, the paper's split has "
            f"{source.rows} (https://huggingface.co/datasets/{source.repo}); is it the right file?"
        )
    rows = []
    for index, record in enumerate(records):
        question = next((record[k] for k in source.question if record.get(k) is not None), None)
        answer = next((record[k] for k in source.answer if record.get(k) is not None), None)
        if question is None or answer is None:
            raise PrepareError(
                f"{files[0]}: record {index} has no {' or '.join(source.question)} / "
                f"{' or '.join(source.answer)} (keys: {', '.join(record)})"
            )
        rows.append(
            {
                "data_source": target.stem,
                "ability": "math",
                "prompt": [{"role": "user", "content": f"{str(question).strip()} {INSTRUCTION}"}],
                "reward_model": {"ground_truth": _answer(answer), "style": "rule"},
                "extra_info": {"index": index, "split": source.split},
            }
        )
    if any(isinstance(r["reward_model"]["ground_truth"], list) for r in rows):  # one type per parquet column
        for r in rows:
            truth = r["reward_model"]["ground_truth"]
            r["reward_model"]["ground_truth"] = truth if isinstance(truth, list) else [truth]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(target)
    return len(rows)


def missing_inputs(cfg) -> list[str]:
    """The files `cfg` reads that are not here (a task makes its own): key and path of each."""
    from .hub import is_hub_id

    if cfg.task.name is not None:
        return []
    missing = (
        []  # a Hub id: downloaded into Hugging Face's cache when the run starts (hub.py)
        if cfg.model.path and ((Path(cfg.model.path) / "config.json").exists() or is_hub_id(cfg.model.path))
        else [f"model.path {cfg.model.path} (no config.json)"]
    )
    for key, paths in (("data.train_files", cfg.data.train_files), ("eval.files", cfg.eval.files)):
        missing += [f"{key} {p}" for p in paths if not Path(p).exists()]
    return missing


def _download(repo: str, directory: Path, repo_type: str, patterns: list[str] | None = None) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    snapshot_download(repo_id=repo, repo_type=repo_type, local_dir=str(directory), allow_patterns=patterns)


def prepare(cfg, *, download: bool = True, log=print) -> list[str]:
    """Make every missing file `cfg` reads; returns what is still missing, each with how to get it."""
    from .hub import ModelSourceError, is_hub_id, resolve_model

    problems = []
    model = cfg.model.path
    if cfg.task.name is None and model and is_hub_id(model):  # into Hugging Face's cache, as `train` reads it
        try:
            if not download:
                raise ModelSourceError(f"model.path {model}: a Hugging Face Hub id, and downloads are off")
            log(f"model.path {model}: a Hugging Face Hub id; downloading into the Hugging Face cache (HF_HOME)")
            log(f"model.path {model}: {resolve_model(model)}")
        except ModelSourceError as exc:
            problems.append(str(exc))
    elif cfg.task.name is None and model and not (Path(model) / "config.json").exists():
        repo = MODELS.get(Path(model).name)
        if repo is None:
            problems.append(
                f"model.path {model}: no known source; put an HF checkpoint (config.json, safetensors) there"
            )
        else:
            try:
                if not download:
                    raise PrepareError("downloads are off")
                log(f"downloading {repo} into {model}")
                _download(repo, Path(model), "model", ["*.json", "*.safetensors", "*.txt", "*.model"])
            except Exception as exc:  # no network, no hub client, an HTTP error: all say what to fetch
                problems.append(
                    f"model.path {model}: could not download https://huggingface.co/{repo} ({_reason(exc)}); "
                    f"fetch it elsewhere (huggingface-cli download {repo} --local-dir {model}) and copy it there"
                )
    for key, paths in (("data.train_files", cfg.data.train_files), ("eval.files", cfg.eval.files)):
        for target in map(Path, paths):
            problem = _prepare_data(key, target, download, log)
            if problem:
                problems.append(problem)
    return problems


def _prepare_data(key: str, target: Path, download: bool, log) -> str | None:
    if target.exists():
        log(f"{target}: present")
        return None
    source = source_for(target)
    if source is None:
        return f"{key} {target}: no known source; put a verl parquet there (prompt, reward_model.ground_truth)"
    raw = raw_dir(target)
    files = [p for p in raw.rglob("*") if p.suffix in DATA_SUFFIXES and ".cache" not in p.parts] if raw.exists() else []
    if not files:
        try:
            if not download:
                raise PrepareError("downloads are off")
            log(f"downloading https://huggingface.co/datasets/{source.repo} into {raw}")
            _download(source.repo, raw, "dataset", [f"*{s}" for s in DATA_SUFFIXES])
            files = [p for p in raw.rglob("*") if p.suffix in DATA_SUFFIXES and ".cache" not in p.parts]
        except Exception as exc:
            return (
                f"{key} {target}: could not download https://huggingface.co/datasets/{source.repo} "
                f"({_reason(exc)}); fetch its data file(s) elsewhere and put them in {raw}/, then run prepare again"
            )
    try:
        rows = convert(source, files, target)
    except PrepareError as exc:
        return f"{key} {exc}"
    log(f"{target}: {rows} rows from {source.repo} (the paper's count)")
    return None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
