"""The Italian data that ships with anita, and where to find it on disk.

Eight small JSONL files, written for anita and released under Apache-2.0 (see README.md in this
folder), one per stage of the LLaMAntino-3-ANITA recipe run in miniature by `anita demo`
(Polignano, Basile, Semeraro, arXiv 2405.07101): instruction conversations for SFT, preference
pairs for DPO (TRL's standard and conversational formats), Italian prose for the continued
pre-training step, and multiple-choice questions in the lm-evaluation-harness layout
(`{"context", "choices", "gold"}`, the continuation being the choice string exactly as given).
Each comes as a train and a held-out split.
"""

import importlib.resources
import pathlib

from anita.errors import AnitaError
from anita.jsonl import parse_object

# Short name -> file name, for every file this package ships.
SHIPPED_FILES = {
    "sft_train": "sft_train.jsonl",
    "sft_heldout": "sft_heldout.jsonl",
    "dpo_train": "dpo_train.jsonl",
    "dpo_heldout": "dpo_heldout.jsonl",
    "pretrain_train": "pretrain_train.jsonl",
    "pretrain_heldout": "pretrain_heldout.jsonl",
    "mc_train": "mc_train.jsonl",
    "mc_heldout": "mc_heldout.jsonl",
}


def data_path(name: str) -> pathlib.Path:
    """Path of a shipped file, by short name ("sft_train") or file name ("sft_train.jsonl")."""
    file_name = SHIPPED_FILES.get(name, name)
    if file_name not in SHIPPED_FILES.values():
        raise AnitaError(
            f"unknown shipped data file {name!r}; expected one of {sorted(SHIPPED_FILES)}")
    path = pathlib.Path(str(importlib.resources.files(__name__) / file_name))
    if not path.is_file():
        raise AnitaError(f"shipped data file {path} is missing; reinstall anita")
    return path


def load_shipped(name: str) -> list[dict]:
    """The rows of a shipped JSONL file as dicts; a bad line raises naming the file and line."""
    path = data_path(name)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                rows.append(parse_object(line))
            except ValueError as e:
                raise AnitaError(f"{path}:{line_no}: {e}") from None
    return rows
