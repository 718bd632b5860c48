"""Prompt data: verl parquet and jsonl files, chat templates, resumable order."""

from .dataset import DataError, Example, PromptDataset, load_examples, render_prompt

__all__ = ["DataError", "Example", "PromptDataset", "load_examples", "render_prompt"]
