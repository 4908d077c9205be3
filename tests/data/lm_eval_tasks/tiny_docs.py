"""Loads tiny.jsonl (next to this file) as the test split of the jambalab tiny lm-eval tasks, offline."""

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "tiny.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
