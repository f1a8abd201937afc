"""The local data behind the test tasks: each JSONL file beside this one as a `datasets` test split
(lm-eval's `custom_dataset` hook; the harness passes its metadata as keyword arguments)."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def split(name: str):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows(name))})


def mc(**_):
    return split("mc")


def docs(**_):
    return split("docs")


def gen(**_):
    return split("gen")


def cloze(**_):
    return split("cloze")
