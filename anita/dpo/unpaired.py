"""Unpaired preference data for KTO: rows {"prompt", "completion", "label"} -> [matched; mismatched] batches.

Rows come from any source of `anita.sources` (JSONL, parquet, CSV, Arrow, dataset directories, Hub ids).

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) learns from single answers marked desirable
(label true) or undesirable (false), in TRL's unpaired format. The prompt and the completion are
strings or message lists, as in `anita.dpo.data`; the label is a JSON boolean. A file of preference
pairs {"prompt", "chosen", "rejected"} is accepted too and unpaired as TRL's
`unpair_preference_dataset` does: every chosen answer becomes a desirable example and every
rejected one an undesirable example, all the desirable ones first (in file order), then the others.
The first row decides which of the two formats a file holds.

Tokenizing and truncation are DPO's (`anita.dpo.data`): the completion is read off the rendered
prompt + completion after its common prefix with the rendered prompt, and a prompt + completion
longer than `max_length` keeps the start of both.

KTO's reference point z₀ is estimated from mismatched pairs (x, y'), built as TRL 1.16 builds them
(`KTOTrainer._prepare_dataset`): within each micro-batch the completions are rotated by one, so
(x_1, y_1), ..., (x_B, y_B) also gives (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B−1}), the batch's own
answers under other prompts. A micro-batch of B examples is laid out like DPO's concatenated
batch: 2B right-padded rows, the B matched rows first, then the B mismatched ones, so the reference
models of `anita.dpo.reference` score it unchanged (their "chosen" half is the matched rows, their
"rejected" half the mismatched ones). TRL samples sequentially so that the batches stay fixed;
anita shuffles the examples each epoch and rotates within whatever batch they land in, so a
mismatched pair cannot be precomputed, and `--reference precomputed` is refused for KTO.

Shapes: B batch (examples), T time (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anita.dpo.data import answer_messages, as_messages, check_lengths, check_preference, pad_rows, some_lines, truncate_pair
from anita.errors import AnitaError
from anita.jsonl import parse_object
from anita.model.tokenizer import common_prefix_length
from anita.sources import open_source, parse_columns, rename
from anita.train.data import EpochBatches

FIELDS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenized example. `line` is its 1-based line in the source file (for messages)."""

    line: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    label: bool  # True: desirable, False: undesirable


@dataclass
class UnpairedData:
    """The kept examples of one file and what happened to the others."""

    path: str
    examples: list[UnpairedExample] = field(default_factory=list)
    from_pairs: bool = False  # the file held preference pairs, unpaired here
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): bad rows skipped on request
    dropped: list[int] = field(default_factory=list)  # lines whose completion could not keep one token
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def desirable(self) -> int:
        return sum(e.label for e in self.examples)

    def summary(self) -> str:
        text = (f"{self.path}: {len(self)} unpaired examples ({self.desirable} desirable, "
                f"{len(self) - self.desirable} undesirable{', unpaired from preference pairs' if self.from_pairs else ''}"
                f"; {self.truncated} truncated)")
        if self.dropped:
            text += f", {len(self.dropped)} dropped: no answer token fits max_length (lines {some_lines(self.dropped)})"
        if self.skipped:
            text += f", {len(self.skipped)} bad rows skipped (lines {some_lines([n for n, _ in self.skipped])})"
        return text


# ------------------------------------------------------------------------------------ rows
def parse_unpaired_row(text) -> tuple[list[dict], list[dict], bool]:
    """One JSONL line (or a decoded row) -> (prompt, completion, label). Raises ValueError saying what is wrong."""
    row = parse_object(text, f"a JSON object with fields {', '.join(FIELDS)}") if isinstance(text, str) else text
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"missing field {missing[0]!r} (an unpaired row needs {', '.join(FIELDS)})")
    prompt = as_messages(row["prompt"], "prompt", "user")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError("field 'prompt' is empty")
    if not isinstance(row["label"], bool):
        raise ValueError(f"field 'label' must be true (desirable) or false (undesirable), got {row['label']!r:.40}")
    return prompt, answer_messages(row, "completion"), row["label"]


def is_paired_row(row) -> bool:
    """Whether a row (a JSONL line or a decoded row) is a preference pair (chosen/rejected), not an unpaired row."""
    row = parse_object(row, f"a JSON object with fields {', '.join(FIELDS)}") if isinstance(row, str) else row
    return "chosen" in row and "completion" not in row


def parse_rows(row, paired: bool) -> list[tuple[list[dict], list[dict], bool]]:
    """One row of either format -> its examples: one unpaired row, or a pair as (chosen, True), (rejected, False)."""
    if not paired:
        return [parse_unpaired_row(row)]
    if isinstance(row, str):
        row = parse_object(row, "a JSON object with fields prompt, chosen, rejected")
    prompt, chosen, rejected, _ = check_preference(row)
    return [(prompt, chosen, True), (prompt, rejected, False)]


def tokenize_example(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) in the checkpoint's chat format, as `anita.dpo.data.tokenize_pair`."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion)
    n = common_prefix_length(prompt_ids, full)
    return prompt_ids[:n], full[n:]


def read_unpaired(source, tokenizer, *, split: str | None = None, config: str | None = None,
                  max_rows: int | None = None, columns=None, max_length: int = 1024,
                  max_prompt_length: int | None = None, skip_bad_rows: bool = False, cache_dir=None) -> UnpairedData:
    """Read, check, render, tokenize and truncate the unpaired (or paired, then unpaired) rows of a
    source. A bad row raises `AnitaError` naming `file:line` (or `file:row N`), or with
    `skip_bad_rows` is skipped and listed. (KTO's data stay Python tuples: `cache_dir` is accepted
    for a uniform call and unused.)
    """
    check_lengths(max_length, max_prompt_length)
    src = open_source(source, split, config, "preference data file")
    mapping = parse_columns(columns)
    data, paired = UnpairedData(src.label), None
    desirable, undesirable = [], []  # a paired file keeps TRL's order: every chosen answer first
    for rec in src.records(max_rows):
        try:
            if rec.error:
                raise ValueError(rec.error)
            row = rename(rec.row, mapping)
            if paired is None:  # the first row decides the format
                paired = data.from_pairs = is_paired_row(row)
            rows = [(tokenize_example(tokenizer, p, c), label) for p, c, label in parse_rows(row, paired)]
        except (ValueError, AnitaError) as e:
            if not skip_bad_rows:
                form = "a preference pair (like the first row)" if paired else "an unpaired row"
                raise AnitaError(f"{rec.where}: {e} (expected {form})") from None
            data.skipped.append((rec.index, str(e)))
            continue
        for (prompt_ids, completion_ids), label in rows:
            kept = truncate_pair(prompt_ids, completion_ids, completion_ids, max_length, max_prompt_length)
            if kept is None:
                data.dropped.append(rec.index)
                continue
            data.truncated += (len(kept[0]), len(kept[1])) != (len(prompt_ids), len(completion_ids))
            example = UnpairedExample(rec.index, tuple(kept[0]), tuple(kept[1]), label)
            (desirable if label or not paired else undesirable).append(example)
    data.examples = desirable + undesirable
    if len(data.examples) < 2:
        raise AnitaError(f"{src.label}: KTO needs at least 2 usable examples to form mismatched pairs ({data.summary()})")
    return data


# --------------------------------------------------------------------------------- collate
def collate_unpaired(examples: list[UnpairedExample], pad_id: int, max_length: int,
                     indices: list[int] | None = None) -> dict:
    """B examples -> [matched; mismatched] rows: input_ids, attention_mask, completion_mask [2B, T];
    label [B] bool; index [B]; num_tokens. Mismatched row i is prompt i with completion i − 1 (mod B),
    cut to fit `max_length`."""
    B = len(examples)
    matched = [(e.prompt_ids, e.completion_ids) for e in examples]
    mismatched = [(e.prompt_ids, examples[i - 1].completion_ids[: max_length - len(e.prompt_ids)])
                  for i, e in enumerate(examples)]  # TRL's rotation: (x_1, y_B), (x_2, y_1), ...
    batch = pad_rows(matched + mismatched, pad_id)  # [2B, T] each
    label = torch.tensor([e.label for e in examples], dtype=torch.bool)  # [B]
    index = torch.tensor(indices if indices is not None else range(B), dtype=torch.long)  # [B]
    return {**batch, "label": label, "index": index, "num_tokens": batch["attention_mask"].sum()}


class UnpairedBatches(EpochBatches):
    """KTO's micro-batches on the shared loop's contract: each epoch's examples (shuffled with
    seed + epoch, or in file order) in micro-batches of `batch_size`, collated by `collate_unpaired`.
    A last micro-batch of one example joins the one before it (alone, its mismatched pair would be
    the example itself)."""

    def __init__(self, data: UnpairedData, batch_size: int, pad_id: int, max_length: int, seed: int = 0,
                 shuffle: bool = True):
        self.examples, self.batch_size, self.pad_id, self.max_length = data.examples, batch_size, pad_id, max_length
        super().__init__(len(self.examples), seed, shuffle)

    def split_epoch(self, order: list[int]) -> list[list[int]]:
        groups = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(groups) > 1 and len(groups[-1]) == 1:
            last = groups.pop()
            groups[-1] = groups[-1] + last
        return groups

    def make_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_unpaired([self.examples[j] for j in indices], self.pad_id, self.max_length, indices)
