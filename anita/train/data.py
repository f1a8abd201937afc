"""Training data: rows of any source -> token ids and labels -> (packed) micro-batches.

Rows come from `anita.sources` (JSONL, parquet, CSV, Arrow, JSON, Hub-layout directories, Hub ids).
Row formats are TRL's dataset conventions (huggingface.co/docs/trl/dataset_formats), recognised from
the column names (`anita.sources.formats`; ShareGPT and Alpaca rows become messages):
  conversational     {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  prompt-completion  {"prompt": "...", "completion": "..."}, or both as lists of messages
  language modeling  {"text": "..."}  (continued pre-training, docs/recipe.md stage 3)
Other keys are ignored. Chats are rendered with the checkpoint's chat format
(`Tokenizer.apply_chat_template`) and only assistant tokens are trained; prompt-completion rows
train the completion only, found as TRL does: the completion starts where the tokens of the
prompt alone and of prompt + completion stop agreeing. Plain prompt-completion and text rows get
the end-of-sequence token appended, as TRL's SFTTrainer does.

Labels are shifted at load time, per example (`labels[t]` is the token position t predicts, or
IGNORE_INDEX), so that packing never asks the last token of one example to predict the first
token of the next. Packing puts consecutive examples (of the shuffled order) in one row while they
fit; positions restart at 0 for each example and attention stays inside it: the batch carries the
rows' `Spans` (`anita.model.masks`), and the model attends within each example alone, the
block-diagonal mask without building it.

Batches hold `batch_size` rows by default. With a token budget (`max_tokens`) they are built by
`budget_batches` instead: length-grouped, at most max_tokens tokens each counting padding, and with
packing one padding-free row each. Their composition is drawn once from the seed and each epoch
shuffles their order (fairseq's `batch_by_size` scheme), so the number per epoch is fixed and a
resumed run finds batch i by its index as before.

The tokenized examples are flat int32 arrays (`anita.sources.store`, the loss mask in the sign bit),
memory-mapped from a cache when one is given; `TokenizedExamples[i]` makes example i's tensors.

Shapes: B rows per micro-batch, T tokens per row.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from anita.errors import AnitaError
from anita.jsonl import parse_object
from anita.model.masks import Spans
from anita.model.logprobs import IGNORE_INDEX, next_token_labels
from anita.model.tokenizer import common_prefix_length
from anita.sources import TokenStore, cached_store, open_source, parse_columns, rename, tokenizer_fingerprint
from anita.sources.formats import sft_row
from anita.sources.store import decode_masked, encode_masked

ROLES = ("system", "user", "assistant")


class BadRow(ValueError):
    """A malformed row; `load_examples` adds the file and line."""


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, already shifted: labels[t] = input_ids[t+1] or IGNORE_INDEX

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DataReport:
    """What happened to the rows of one file; `summary()` is printed at the start of a run."""

    file: str
    kept: int = 0
    skipped_bad: int = 0  # malformed rows skipped because of --skip-bad-rows
    truncated: int = 0  # rows cut to max_length that still have tokens to train on
    dropped_truncated: int = 0  # rows whose trained tokens all fell beyond max_length
    tokens: int = 0
    trained_tokens: int = 0
    bad_lines: list[int] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # recognised format -> rows
    cache: str | None = None  # "reused from the cache FOLDER" or "newly cached in FOLDER" when the tokens are cached

    def summary(self) -> str:
        formats = ", ".join(f"{name} ({n})" if len(self.formats) > 1 else name for name, n in self.formats.items())
        text = (f"{self.file}: {self.kept} examples, format {formats or 'none'}, {self.tokens} tokens "
                f"({self.trained_tokens} trained); {self.truncated} truncated to max_length")
        if self.dropped_truncated:
            text += f", {self.dropped_truncated} dropped (nothing left to train on after truncation)"
        if self.skipped_bad:
            shown = ", ".join(map(str, self.bad_lines[:10])) + (", ..." if len(self.bad_lines) > 10 else "")
            text += f", {self.skipped_bad} malformed rows skipped (lines {shown})"
        if self.cache:
            text += f"; tokens {self.cache}"
        return text


# --------------------------------------------------------------------------- row checks
def _check_text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"field {key!r} is empty")
    return value


def _check_messages(messages, key: str, roles=ROLES) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"field {key!r} must be a non-empty list of {{'role', 'content'}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRow(f"{key}[{i}] must be an object with 'role' and 'content', got {m!r}")
        for name in ("role", "content"):
            if name not in m:
                raise BadRow(f"{key}[{i}] is missing field {name!r}")
        if m["role"] not in roles:
            raise BadRow(f"{key}[{i}] has role {m['role']!r}; expected one of {', '.join(roles)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadRow(f"{key}[{i}] ({m['role']}) has empty or non-string content")
    return messages


def parse_row(line: str) -> tuple[str, dict]:
    """JSON text -> (kind, row) with the format's fields checked; raises BadRow."""
    try:
        row = parse_object(line)
    except ValueError as e:
        raise BadRow(str(e)) from None
    return check_row(row)[:2]


def check_row(row: dict, text_field: str | None = None) -> tuple[str, dict, str]:
    """A decoded row -> (kind `render_row` takes, row, format recognised), its fields checked; raises BadRow."""
    try:
        fmt, row = sft_row(row, text_field)
    except ValueError as e:
        raise BadRow(str(e)) from None
    if "messages" in row and fmt != "text":
        messages = _check_messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("'messages' has no assistant message to train on")
        return "messages", row, fmt
    if fmt == "prompt-completion":
        if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            _check_messages(row.get("prompt"), "prompt")
            _check_messages(row.get("completion"), "completion", roles=("assistant",))
            return "chat_completion", row, fmt
        _check_text(row, "prompt"), _check_text(row, "completion")
        return "completion", row, fmt
    _check_text(row, "text")
    return "text", row, fmt


# ----------------------------------------------------------------------------- rendering
def render_row(kind: str, row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the tokens to train on (the targets, before shifting)."""
    if kind == "messages":
        return tokenizer.apply_chat_template(row["messages"], return_assistant_mask=True)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if kind == "text":
        ids = tokenizer.encode(row["text"]) + eos
        return ids, [1] * len(ids)
    if kind == "chat_completion":
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"])
    else:
        prompt = tokenizer.encode(row["prompt"])
        ids = tokenizer.encode(row["prompt"] + row["completion"]) + eos
    start = common_prefix_length(prompt, ids)  # where the completion starts (TRL's rule)
    return ids, [0] * start + [1] * (len(ids) - start)


def make_example(ids: list[int], mask: list[int], max_length: int) -> tuple[Example, bool]:
    """Cut to `max_length` and shift the mask into labels; returns (example, was_truncated)."""
    truncated = len(ids) > max_length
    ids_t = torch.tensor(ids[:max_length], dtype=torch.long)[None]  # (1, T)
    mask_t = torch.tensor(mask[:max_length], dtype=torch.long)[None]  # (1, T)
    labels = next_token_labels(ids_t, mask_t)[0]  # (T,)
    return Example(ids_t[0], labels), truncated


class TokenizedExamples:
    """The examples of one source over a `TokenStore` (one masked segment each): `examples[i]` is an
    `Example` made on demand; `lengths` holds every example's length without making any; `where(i)`
    names example i's source and line (or row) for messages."""

    def __init__(self, store: TokenStore, label: str = "data"):
        self.store, self.label = store, label
        self.lengths = store.lengths().tolist()

    def where(self, i: int) -> str:
        return f"{self.label}:{int(self.store.rows[i])}"

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> Example:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ids, mask = decode_masked(self.store.segments(i)[0])
        ids_t = torch.from_numpy(ids)[None]  # (1, T)
        labels = next_token_labels(ids_t, torch.from_numpy(mask).long()[None])[0]  # (T,)
        return Example(ids_t[0], labels)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def load_examples(source, tokenizer, max_length: int, skip_bad_rows: bool = False, *, split: str | None = None,
                  config: str | None = None, max_rows: int | None = None, columns=None, text_field: str | None = None,
                  cache_dir=None) -> tuple[TokenizedExamples, DataReport]:
    """Read and render every row of a source (a file, a dataset directory, a Hub id; `split` and
    `config` of the last two). A malformed row is an AnitaError naming file:line or file:row N (or,
    with `skip_bad_rows`, is skipped and counted); a row left with no trained token by truncation is
    dropped and counted. With `cache_dir`, the tokens are cached there (anita.sources.store)."""
    src = open_source(source, split, config, "data file")
    mapping = parse_columns(columns)
    key = {"reader": "sft", "source": src.fingerprint(), "max_rows": max_rows, "columns": mapping,
           "text_field": text_field, "skip_bad_rows": skip_bad_rows, "max_length": max_length,
           "tokenizer": tokenizer_fingerprint(tokenizer) if cache_dir is not None else None}

    def build(writer) -> dict:
        report, formats = DataReport(src.label), Counter()
        for rec in src.records(max_rows):
            try:
                if rec.error:
                    raise BadRow(rec.error)
                kind, row, fmt = check_row(rename(rec.row, mapping), text_field)
                ids, mask = render_row(kind, row, tokenizer)
            except (BadRow, AnitaError) as e:
                if not skip_bad_rows:
                    raise AnitaError(f"{rec.where}: {e} (or pass --skip-bad-rows to skip such rows)") from None
                report.skipped_bad += 1
                report.bad_lines.append(rec.index)
                continue
            ids, mask, truncated = ids[:max_length], mask[:max_length], len(ids) > max_length
            trained = sum(mask[1:])  # next-token labels: position t predicts token t + 1
            if trained == 0:
                report.dropped_truncated += 1
                continue
            writer.add([encode_masked(ids, mask)], rec.index)
            formats[fmt] += 1
            report.truncated += truncated
            report.kept += 1
            report.tokens += len(ids)
            report.trained_tokens += trained
        report.formats = dict(formats)
        if not report.kept:
            raise AnitaError(f"{src.label}: no usable rows ({report.summary()})")
        return dataclasses.asdict(report)

    store, saved, cache = cached_store(key, 1, build, cache_dir)
    report = DataReport(**{**saved, "cache": cache})
    return TokenizedExamples(store, src.label), report


# ---------------------------------------------------------------------- rows and batches
def pack_rows(lengths: list[int], order: list[int], max_length: int, packing: bool) -> list[list[int]]:
    """Group example indices into rows: one per row, or (packing) consecutive examples of
    `order` while their total length fits in `max_length`."""
    if not packing:
        return [[i] for i in order]
    rows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return rows + [current] if current else rows


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> one micro-batch, right-padded to the longest row.

    input_ids, labels, position_ids: (B, T). attention_mask: (B, T) 0/1 when every row holds one
    example, else the rows' `Spans` (where each example starts and ends: the model attends within
    each example alone, with no (B, T, T) mask; `Spans.mask` is the block-diagonal mask they stand
    for). `num_tokens` counts the real (non-pad) tokens.
    """
    T = max(sum(len(e.input_ids) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    spans = []  # per row, the (start, end) of each example
    for b, row in enumerate(rows):
        start, spans_b = 0, []
        for e in row:
            end = start + len(e.input_ids)
            input_ids[b, start:end], labels[b, start:end] = e.input_ids, e.labels
            position_ids[b, start:end] = torch.arange(end - start)  # restarts per example
            spans_b.append((start, end))
            start = end
        spans.append(tuple(spans_b))
    lengths = torch.tensor([row[-1][1] for row in spans])  # (B,) real tokens per row
    if max(len(row) for row in rows) == 1:
        attention_mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T) padding mask
    else:
        attention_mask = Spans(tuple(spans))  # packed rows: varlen attention, no mask
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": attention_mask, "num_tokens": lengths.sum()}


LENGTH_GROUP_WINDOW = 256  # items sorted by length together (as HF's group_by_length sorts its "megabatches")


def budget_batches(lengths: list[int], order: list[int], max_tokens: int, packing: bool,
                   window: int = LENGTH_GROUP_WINDOW) -> list[list[list[int]]]:
    """Items (lengths in tokens, taken in `order`) -> micro-batches, each a list of rows of item
    indices holding at most `max_tokens` tokens counting padding (rows × longest row).

    Length grouping: `order` is cut into windows of `window` items, each sorted longest first
    (stable), so a micro-batch holds items of similar length. Without packing each item is a row
    and a micro-batch takes rows while they fit; with packing a micro-batch is one row, filled
    first-fit (each item goes to the first row of its window with room for it): no padding at all.
    Every item must fit alone (`check_budget`).
    """
    batches = []
    for start in range(0, len(order), window):
        items = sorted(order[start:start + window], key=lambda i: -lengths[i])  # (n,) longest first
        if packing:
            rows, used = [], []
            for i in items:
                r = next((r for r, u in enumerate(used) if u + lengths[i] <= max_tokens), len(rows))
                if r == len(rows):
                    rows.append([])
                    used.append(0)
                rows[r].append(i)
                used[r] += lengths[i]
            batches += [[row] for row in rows]
            continue
        batch: list[list[int]] = []
        for i in items:  # longest first: a batch's first row is its longest, the length all are padded to
            if batch and (len(batch) + 1) * lengths[batch[0][0]] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append([i])
        batches += [batch] if batch else []
    return batches


def check_budget(lengths: list[int], max_tokens: int, what) -> None:
    """AnitaError naming the first item longer than the token budget (`what(i)` describes item i)."""
    too_long = next((i for i, n in enumerate(lengths) if n > max_tokens), None)
    if too_long is not None:
        raise AnitaError(f"{what(too_long)} takes {lengths[too_long]} tokens, more than --max-tokens {max_tokens}; "
                         "raise --max-tokens or lower --max-length")


def fixed_budget_batches(lengths: list[int], max_tokens: int, packing: bool, seed: int,
                         shuffle: bool) -> list[list[list[int]]]:
    """`budget_batches` of the items in a seeded random order (file order if not shuffled): the
    composition every epoch shares; `EpochBatches` then orders these batches per epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    return budget_batches(lengths, order, max_tokens, packing)


class EpochBatches:
    """The shared loop's data contract: a deterministic, endless stream of micro-batches.

    `self[i]` is micro-batch i - e·per_epoch of epoch e; epoch e orders the items with
    `torch.randperm` seeded with seed + e (or keeps file order), and a subclass groups that order
    into micro-batches (`split_epoch`) and turns one into tensors (`make_batch`). So "data position" is
    one integer, and a resumed or data-parallel run can find any micro-batch without reading the
    ones before it. Iterating gives epoch 0 (what evaluation reads).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool):
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self._epoch, self._batches = -1, []
        self.per_epoch = len(self.epoch_batches(0))  # micro-batches per epoch

    def split_epoch(self, order: list[int]) -> list:
        """One epoch's item indices, in order -> its micro-batches (what `make_batch` takes, one each)."""
        raise NotImplementedError

    def make_batch(self, batch) -> dict[str, torch.Tensor]:
        """One micro-batch of `split_epoch` -> its tensors."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list:
        """The micro-batches of `epoch`, as `split_epoch` made them (the last epoch asked is cached)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist() if self.shuffle \
                else list(range(self.num_items))
            self._epoch, self._batches = epoch, self.split_epoch(order)
        return self._batches

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, self.per_epoch)
        return self.make_batch(self.epoch_batches(epoch)[i])

    def __len__(self) -> int:
        return self.per_epoch  # one epoch; indexing past it continues into the next epochs

    def __iter__(self):
        return (self[i] for i in range(self.per_epoch))


class MicroBatches(EpochBatches):
    """SFT's micro-batches: each epoch's examples grouped into rows (`pack_rows`), the rows into
    micro-batches of `batch_size` rows, each made into tensors by `collate`; or, with `max_tokens`,
    the token-budget batches of `fixed_budget_batches` in an order drawn per epoch."""

    def __init__(self, examples: list[Example], batch_size: int, max_length: int, packing: bool,
                 pad_id: int, seed: int = 0, shuffle: bool = True, max_tokens: int | None = None):
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.packing, self.pad_id = packing, pad_id
        self._lengths = getattr(examples, "lengths", None) or [len(e.input_ids) for e in examples]
        self.budget = None  # with max_tokens: the fixed micro-batches, which each epoch orders
        if max_tokens is not None:
            where = getattr(examples, "where", None)  # a plain list of examples knows no source
            check_budget(self._lengths, max_tokens, (lambda i: f"{where(i)}: this example") if where else
                         (lambda i: f"example {i}"))
            self.budget = fixed_budget_batches(self._lengths, max_tokens, packing, seed, shuffle)
        super().__init__(len(examples) if self.budget is None else len(self.budget), seed, shuffle)

    def split_epoch(self, order: list[int]) -> list[list[list[int]]]:
        if self.budget is not None:
            return [self.budget[i] for i in order]
        rows = pack_rows(self._lengths, order, self.max_length, self.packing)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def make_batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate([[self.examples[j] for j in row] for row in rows], self.pad_id)
