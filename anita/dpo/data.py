"""Preference data for DPO: rows {"prompt", "chosen", "rejected"} -> token ids -> [chosen; rejected] batches.

Rows come from any source of `anita.sources` (JSONL, parquet, CSV, Arrow, JSON, dataset directories,
Hub ids such as HuggingFaceH4/ultrafeedback_binarized). Row formats (TRL's preference-dataset
conventions, huggingface.co/docs/trl "Dataset formats"):
- standard: prompt, chosen and rejected are strings. The prompt becomes one user message and each
  answer one assistant message, so every row is rendered with the checkpoint's chat format.
- conversational: prompt is a list of {"role", "content"} messages (system, user, earlier turns),
  chosen and rejected are lists of assistant messages.
- implicit prompt: chosen and rejected hold the whole conversation (UltraFeedback-binarized); the
  prompt is their common prefix, as TRL's `extract_prompt` finds it (`anita.sources.formats`).

The kept pairs are flat int32 arrays (`anita.sources.store`: prompt, chosen, rejected segments),
memory-mapped from the token cache when one is given; `data.pairs[i]` makes one `PreferencePair`.

Tokenizing (TRL 1.16 `DPOTrainer._prepare_dataset`): the prompt is rendered with the generation
prompt, prompt + answer without it; an answer's ids are the ids of prompt + answer after their
common prefix with the prompt's ids, so each answer ends with the chat format's end-of-turn marker.

Truncation (TRL's `tokenize_row` before v0.20, truncation_mode="keep_start"): when the prompt plus
the longer answer exceeds `max_length`, the prompt keeps its first `max_prompt_length` tokens; if
that is still too long, each answer keeps its first `max_length - len(prompt)` tokens (TRL cut to
`max_length - max_prompt_length`, which wastes the budget of a short prompt). A row where no answer
token would survive is dropped, counted and reported, never trained on silently.

Two batch layouts, giving the same log-probs (tests/dpo/test_shared_prompt.py):
- two-row (`collate_pairs`, the plain one): TRL's `DataCollatorForPreference`: B pairs become 2B
  right-padded rows, the B prompt+chosen rows first, then the B prompt+rejected rows, with a
  completion mask (1 on answer tokens). Every prompt is computed twice.
- shared-prompt (`collate_shared`, the default of `anita dpo`): one row per pair laid out
  [prompt; chosen; rejected], or with packing several pairs in one padding-free row, described per
  token by segment / branch / position ids (`anita.model.masks`): each answer attends to its prompt
  and to itself, never to the other answer, and both answers' positions go on from the prompt's end
  (Wang et al. 2024, "Accelerating DPO with Prefix Sharing", arXiv 2410.20305). Each prompt is
  computed once. docs/dpo.md draws the layout.
Micro-batches hold `batch_size` pairs, or with `max_tokens` as many as fit that many tokens
(`anita.train.data.budget_batches`: length-grouped, fixed composition, order drawn per epoch).

Shapes: B batch (pairs), T time (tokens).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from anita.errors import AnitaError
from anita.jsonl import parse_object
from anita.model.masks import Spans
from anita.model.tokenizer import common_prefix_length
from anita.sources import TokenStore, cached_store, open_source, parse_columns, rename, tokenizer_fingerprint
from anita.sources.formats import preference_parts
from anita.train.data import EpochBatches, check_budget, fixed_budget_batches

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized row. `line` is its 1-based line (JSON Lines) or 0-based row in the source (for messages)."""

    line: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


class PairView:
    """The pairs of a `TokenStore` of (prompt, chosen, rejected) segments, as `PreferencePair`s on demand."""

    def __init__(self, store: TokenStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return PreferencePair(int(self.store.rows[i]), *(tuple(s.tolist()) for s in self.store.segments(i)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class PreferenceData:
    """The kept pairs of one source and what happened to the others."""

    path: str
    pairs: PairView | list[PreferencePair] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): bad rows skipped on request
    dropped: list[int] = field(default_factory=list)  # lines whose answers could not keep one token
    truncated: int = 0  # kept rows whose prompt or answers were cut
    formats: dict[str, int] = field(default_factory=dict)  # "preference (implicit prompt)" -> rows
    cache: str | None = None  # "reused from the cache FOLDER" / "newly cached in FOLDER" when the tokens are cached

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        formats = ", ".join(f"{k} ({n})" if len(self.formats) > 1 else k for k, n in self.formats.items())
        text = f"{self.path}: {len(self.pairs)} preference pairs ({formats or 'no format'}; {self.truncated} truncated)"
        if self.dropped:
            text += f", {len(self.dropped)} dropped: no answer token fits max_length (lines {some_lines(self.dropped)})"
        if self.skipped:
            text += f", {len(self.skipped)} bad rows skipped (lines {some_lines([n for n, _ in self.skipped])})"
        if self.cache:
            text += f"; tokens {self.cache}"
        return text

    def fingerprint(self) -> str:
        """sha256 of every kept pair's token ids, in order: names this exact tokenized data set."""
        h = hashlib.sha256()
        if isinstance(self.pairs, PairView):  # the flat arrays say it all: segment bounds, then tokens
            store = self.pairs.store
            h.update(np.ascontiguousarray(store.offsets - store.offsets[0]).tobytes())
            h.update(np.ascontiguousarray(store.tokens[store.offsets[0]:store.offsets[-1]]).tobytes())
            return h.hexdigest()
        offsets, tokens = [0], []
        for p in self.pairs:
            for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
                tokens.extend(ids)
                offsets.append(len(tokens))
        h.update(np.asarray(offsets, dtype=np.int64).tobytes())
        h.update(np.asarray(tokens, dtype=np.int32).tobytes())
        return h.hexdigest()


def some_lines(lines: list[int], n: int = 5) -> str:
    return ", ".join(map(str, lines[:n])) + (", ..." if len(lines) > n else "")


# ------------------------------------------------------------------------------------ rows
def as_messages(value, name: str, role: str) -> list[dict]:
    """A string becomes one message of `role`; a list must hold {"role", "content"} string dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {name!r} must be a string or a non-empty list of messages, got {value!r:.60}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"field {name!r}: message {i} must be a dict with string 'role' and 'content', "
                             f"got {m!r:.60}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def answer_messages(row: dict, name: str) -> list[dict]:
    """The assistant messages of `chosen` or `rejected`; empty answers are refused."""
    messages = as_messages(row[name], name, "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise ValueError(f"field {name!r}: message {i} has role {m['role']!r}; answers hold assistant "
                             "messages only (put earlier turns in 'prompt')")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"field {name!r} is empty")
    return messages


def parse_row(text: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One JSONL line -> (prompt, chosen, rejected) messages. Raises ValueError saying what is wrong."""
    return check_preference(parse_object(text, f"a JSON object with fields {', '.join(FIELDS)}"))[:3]


def check_preference(row: dict) -> tuple[list[dict], list[dict], list[dict], str]:
    """A decoded row -> (prompt, chosen, rejected) messages and its format; ValueError saying what is wrong."""
    prompt, chosen, rejected, implicit = preference_parts(row)
    prompt = as_messages(prompt, "prompt", "user")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError("field 'prompt' is empty")
    row = {"chosen": chosen, "rejected": rejected}
    chosen, rejected = answer_messages(row, "chosen"), answer_messages(row, "rejected")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical; a preference needs two different answers")
    return prompt, chosen, rejected, f"preference ({'implicit' if implicit else 'explicit'} prompt)"


# ------------------------------------------------------------------------------- tokenize
def tokenize_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """Token ids (prompt, chosen, rejected) of one row in the checkpoint's chat format.

    As TRL 1.16 does, the answers are read off the rendered prompt + answer after its common
    prefix with the rendered prompt (which ends with the generation prompt).
    """
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full_chosen = tokenizer.apply_chat_template(prompt + chosen)
    full_rejected = tokenizer.apply_chat_template(prompt + rejected)
    n = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
    return prompt_ids[:n], full_chosen[n:], full_rejected[n:]


def truncate_pair(prompt, chosen, rejected, max_length: int, max_prompt_length: int | None):
    """TRL's keep_start truncation (see the module docstring). -> (prompt, chosen, rejected) or None.

    None means that not even one token of each answer fits in `max_length`: the row is dropped.
    """
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length and max_prompt_length is not None:
        prompt = prompt[:max_prompt_length]  # keep the start of the prompt budget
    budget = max_length - len(prompt)
    if budget < 1 or not chosen or not rejected:
        return None
    return prompt, chosen[:budget], rejected[:budget]


def check_lengths(max_length: int, max_prompt_length: int | None) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise AnitaError(f"max_length must be an integer >= 2, got {max_length!r}")
    ok = isinstance(max_prompt_length, int) and 1 <= max_prompt_length < max_length
    if max_prompt_length is not None and not ok:
        raise AnitaError(f"max_prompt_length must be an integer in [1, max_length = {max_length}) so that the "
                         f"answers keep at least one token, got {max_prompt_length!r}")


def read_preferences(source, tokenizer, *, split: str | None = None, config: str | None = None,
                     max_rows: int | None = None, columns=None, max_length: int = 1024,
                     max_prompt_length: int | None = None, skip_bad_rows: bool = False,
                     cache_dir=None) -> PreferenceData:
    """Read, check, render, tokenize and truncate the preference rows of a source (a file, a dataset
    directory or a Hub id; `split` and `config` of the last two).

    A bad row (bad JSON, missing field, empty or identical answers, ...) raises `AnitaError` naming
    `file:line` (`file:row N` for parquet, CSV, Arrow), or with `skip_bad_rows` is skipped and listed
    in `PreferenceData.skipped`. Blank lines are ignored. Rows whose answers cannot keep one token
    are listed in `dropped`. With `cache_dir`, the tokens are cached there (anita.sources.store).
    """
    check_lengths(max_length, max_prompt_length)
    src = open_source(source, split, config, "preference data file")
    mapping = parse_columns(columns)
    key = {"reader": "preferences", "source": src.fingerprint(), "max_rows": max_rows, "columns": mapping,
           "max_length": max_length, "max_prompt_length": max_prompt_length, "skip_bad_rows": skip_bad_rows,
           "tokenizer": tokenizer_fingerprint(tokenizer) if cache_dir is not None else None}

    def build(writer) -> dict:
        data, formats = PreferenceData(src.label), Counter()
        for rec in src.records(max_rows):
            try:
                if rec.error:
                    raise ValueError(rec.error)
                prompt, chosen, rejected, fmt = check_preference(rename(rec.row, mapping))
                ids = tokenize_pair(tokenizer, prompt, chosen, rejected)
            except (ValueError, AnitaError) as e:
                if not skip_bad_rows:
                    raise AnitaError(f"{rec.where}: {e}") from None
                data.skipped.append((rec.index, str(e)))
                continue
            kept = truncate_pair(*ids, max_length, max_prompt_length)
            if kept is None:
                data.dropped.append(rec.index)
                continue
            data.truncated += tuple(map(len, kept)) != tuple(map(len, ids))
            writer.add(kept, rec.index)
            formats[fmt] += 1
        if not formats:
            raise AnitaError(f"{src.label}: no usable preference pairs ({data.summary()})")
        return {"skipped": data.skipped, "dropped": data.dropped, "truncated": data.truncated,
                "formats": dict(formats)}

    store, report, cache = cached_store(key, 3, build, cache_dir)
    return PreferenceData(src.label, PairView(store), [tuple(s) for s in report["skipped"]], report["dropped"],
                          report["truncated"], report["formats"], cache)


# --------------------------------------------------------------------------------- collate
def collate_pairs(pairs: list[PreferencePair], pad_id: int, indices: list[int] | None = None) -> dict:
    """B pairs -> the concatenated batch of TRL's DataCollatorForPreference, right-padded.

    input_ids [2B, T] (rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected), attention_mask
    [2B, T] (1 on real tokens), completion_mask [2B, T] (1 on answer tokens), and `index` [B]: each
    pair's position in its data set (it keys precomputed reference log-probs), 0..B-1 if not given;
    `num_tokens`, the real tokens (for the loop's tokens/s).
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = pad_rows(rows, pad_id)  # [2B, T] each
    index = torch.tensor(indices if indices is not None else range(len(pairs)), dtype=torch.long)  # [B]
    return {**batch, "index": index, "num_tokens": batch["attention_mask"].sum()}


def pad_rows(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """N (prompt ids, answer ids) rows -> right-padded input_ids, attention_mask, completion_mask [N, T]."""
    T = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)  # [N, T]
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)  # [N, T]
    for i, (prompt, answer) in enumerate(rows):
        n, m = len(prompt), len(answer)
        input_ids[i, : n + m] = torch.tensor(tuple(prompt) + tuple(answer), dtype=torch.long)
        attention_mask[i, : n + m] = 1
        completion_mask[i, n : n + m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# Branch ids of the shared-prompt layout (anita.model.masks): the shared prompt and the two answers.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_row(pair: PreferencePair, segment: int, start: int) -> dict[str, list[int]]:
    """One pair as [prompt; chosen; rejected] at offset `start` of a row: per-token lists of ids,
    positions (each answer continues from the prompt's end), segment, branch, and `source`, the row
    index of the token that predicts this one (the previous token of the same answer, or the
    prompt's last token for an answer's first token; -1 for prompt tokens, which are not scored)."""
    P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    last_prompt = start + P - 1 if P else -1

    def sources(first: int, n: int) -> list[int]:  # the answer that starts at row index `first`
        return [last_prompt] + [first + j - 1 for j in range(1, n)] if n else []

    return {"input_ids": list(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids),
            "position_ids": list(range(P)) + list(range(P, P + C)) + list(range(P, P + R)),
            "segment": [segment] * (P + C + R),
            "branch": [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R,
            "source": [-1] * P + sources(start + P, C) + sources(start + P + C, R)}


def collate_shared(rows: list[list[int]], pairs: list[PreferencePair], pad_id: int) -> dict:
    """Rows of pair indices (into `pairs`) -> the shared-prompt batch, right-padded to the longest row.

    input_ids, position_ids, segment, branch, source [N, T] (N rows; segment: the pair's place
    0..B-1 in `index`, -1 on padding; branch: PROMPT, CHOSEN, REJECTED); `spans`, where each pair's
    prompt, chosen and rejected answer lie (the attention the model computes, `anita.model.masks`);
    `index` [B], the pairs' indices in their data set, in segment order; `num_tokens`, the real tokens.
    """
    index = [i for row in rows for i in row]
    built, spans, segment = [], [], 0
    for row in rows:
        parts, spans_row = {}, []
        for i in row:
            start, pair = len(parts.get("input_ids", ())), pairs[i]
            part = shared_row(pair, segment, start)
            parts = {k: parts.get(k, []) + v for k, v in part.items()}
            prompt_end = start + len(pair.prompt_ids)  # then chosen, then rejected: anita.model.masks.Spans
            spans_row.append((start, prompt_end, prompt_end + len(pair.chosen_ids), start + len(part["input_ids"])))
            segment += 1
        built.append(parts)
        spans.append(tuple(spans_row))
    T = max(len(parts["input_ids"]) for parts in built)
    fill = {"input_ids": pad_id, "position_ids": 0, "segment": -1, "branch": -1, "source": -1}
    batch = {k: torch.tensor([parts[k] + [v] * (T - len(parts[k])) for parts in built], dtype=torch.long)
             for k, v in fill.items()}  # [N, T] each
    return {**batch, "spans": Spans(tuple(spans)), "index": torch.tensor(index, dtype=torch.long),
            "num_tokens": (batch["segment"] >= 0).sum()}


def pair_lengths(pairs: PairView | list[PreferencePair], shared_prompt: bool) -> list[int]:
    """Tokens each pair takes in a batch: [prompt; chosen; rejected] once, or two rows of the longer
    answer. Read off the token store's offsets when the pairs are a `PairView` (no pair is built)."""
    if isinstance(pairs, PairView):
        sizes = np.diff(pairs.store.offsets).reshape(-1, 3)  # [N, 3] prompt, chosen, rejected
    else:
        sizes = np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]).reshape(-1, 3)
    P, C, R = sizes.T  # [N] each
    return (P + C + R if shared_prompt else 2 * (P + np.maximum(C, R))).tolist()


class PreferenceBatches(EpochBatches):
    """DPO's micro-batches on the shared loop's contract (`anita.train.data.EpochBatches`): each
    epoch's pairs (shuffled with seed + epoch, or in file order) in micro-batches of `batch_size`
    pairs (the last may be smaller), or with `max_tokens` the token-budget batches of
    `fixed_budget_batches` (with `packing`, one padding-free row each) in an order drawn per epoch.
    Collated by `collate_pairs` (two rows per pair) or, with `shared_prompt`, `collate_shared`.

    With `ref_logps` = (chosen [N], rejected [N]), precomputed reference log-probs indexed like
    `data.pairs`, each batch also carries its pairs' `ref_chosen_logps` and `ref_rejected_logps` [B].
    """

    def __init__(self, data: PreferenceData, batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None, shared_prompt: bool = False,
                 packing: bool = False, max_tokens: int | None = None):
        if ref_logps is not None and any(len(t) != len(data.pairs) for t in ref_logps):
            raise AnitaError(f"{data.path}: {len(data.pairs)} pairs but the reference log-prob table has "
                             f"{len(ref_logps[0])} rows")
        if packing and not (shared_prompt and max_tokens):
            raise AnitaError("DPO packing needs the shared-prompt layout and a token budget (--max-tokens)")
        self.pairs, self.batch_size, self.pad_id, self.ref_logps = data.pairs, batch_size, pad_id, ref_logps
        self.shared_prompt, self.budget = shared_prompt, None
        if max_tokens is not None:
            lengths = pair_lengths(self.pairs, shared_prompt)
            check_budget(lengths, max_tokens, lambda i: f"{data.path}:{self.pairs[i].line}: this pair")
            self.budget = fixed_budget_batches(lengths, max_tokens, packing, seed, shuffle)
        super().__init__(len(self.pairs) if self.budget is None else len(self.budget), seed, shuffle)

    def split_epoch(self, order: list[int]) -> list[list[list[int]]]:
        """Micro-batches as rows of pair indices (the two-row layout flattens them)."""
        if self.budget is not None:
            return [self.budget[i] for i in order]
        return [[[i] for i in order[j:j + self.batch_size]] for j in range(0, len(order), self.batch_size)]

    def make_batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        indices = [i for row in rows for i in row]
        if self.shared_prompt:
            batch = collate_shared(rows, self.pairs, self.pad_id)
        else:
            batch = collate_pairs([self.pairs[j] for j in indices], self.pad_id, indices)
        if self.ref_logps is not None:
            batch["ref_chosen_logps"] = self.ref_logps[0][indices]  # [B]
            batch["ref_rejected_logps"] = self.ref_logps[1][indices]  # [B]
        return batch
