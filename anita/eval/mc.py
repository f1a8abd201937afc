"""Multiple-choice evaluation scored exactly as EleutherAI's lm-evaluation-harness scores
log-likelihood tasks (arc, hellaswag, mmlu and their Italian versions in docs/recipe.md).

References (lm-evaluation-harness v0.4): `lm_eval/api/model.py` (`TemplateLM._encode_pair`,
`loglikelihood`), `lm_eval/models/huggingface.py` (`HFLM.tok_encode`, `_loglikelihood_tokens`),
`lm_eval/api/task.py` (`process_results` for multiple_choice), `lm_eval/api/samplers.py`
(`ContextSampler`), `lm_eval/api/metrics.py` (`mean`, `mean_stderr`).

Task file: any source of `anita.sources` (JSONL, parquet, CSV, JSON, ...), one question per row,
`{"context": str, "choices": [str, ...], "gold": int}`.
The continuation scored for a choice is the choice string exactly as given (a task that wants a
space between question and answer puts it in the choices, e.g. " Roma").

Scoring one (context, continuation) pair:
  1. Trailing whitespace of the context moves to the front of the continuation
     ("Risposta: " + "Roma" is scored as "Risposta:" + " Roma"), so the space is tokenized with
     the word as BPE vocabularies expect.
  2. context_ids = encode(context),
     continuation_ids = encode(context + continuation)[len(context_ids):]:
     the continuation is cut from the tokenization of the whole string.
     Encoding adds no special tokens: the harness's default for causal LMs (add_bos_token=False)
     up to v0.4.9, which ANITA's published numbers used. `add_special_tokens=True` adds the
     tokenizer's own (a BOS for Llama 3), as the harness does with add_bos_token=True, and by
     default since it delegated BOS to the tokenizer (PR #3347, 2025).
  3. An empty context is [BOS] (EOS when the vocabulary has no BOS); the continuation is
     encode(continuation) — unless that already starts with that token, which then becomes the
     context (harness `TemplateLM.loglikelihood`).
  4. A pair longer than the model's max_position_embeddings L is cut from the left: the model
     reads (context_ids + continuation_ids)[-(L+1):][:-1].
  5. log-likelihood = Σ_t log p(continuation_t | all before it), log-softmax in fp32 (scoring.py).

Metrics of one question (ties go to the first choice, as np.argmax), named as the harness names
them (`ConfigurableTask.process_results`, multiple_choice):
  acc       = [argmax_i ll_i == gold]
  acc_norm  = [argmax_i ll_i / len(choice_i) == gold]                 (characters)
  acc_bytes = [argmax_i ll_i / len(choice_i.encode("utf-8")) == gold]  (UTF-8 bytes)
acc_norm and acc_bytes differ only for choices with non-ASCII text ("è" is one character, two
bytes). The paper's arc_it and hellaswag_it figures are acc_norm (docs/recipe.md).
Over n questions each metric is a mean; its stderr is the harness's `mean_stderr`: the sample
standard deviation (n − 1 in the denominator) over √n, null for n < 2.

Few-shot (harness `ContextSampler`, fewshot_delimiter "\\n\\n", empty target delimiter because
the choice carries its own space): one `random.Random(seed)` (harness default seed 1234) for the
whole run; for each question, in file order, `rng.sample(pool, K)` picks the examples from the
few-shot file, as they are (a separate split: nothing is removed) — or, without one,
`rng.sample(questions, K + 1)` with the question itself (any row equal to it) removed and the
first K kept; should that leave fewer than K (the task repeats the question), K are drawn again
from the questions without any copy of it (harness 0.4.13 `ContextSampler.sample`). The scored
context is

    ex_1.context + ex_1.choices[ex_1.gold] + "\\n\\n" + ...
    + ex_K.context + ex_K.choices[ex_K.gold] + "\\n\\n" + question.context

e.g. "Capitale della Francia: Parigi\\n\\nCapitale d'Italia:" for one example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from anita.errors import AnitaError
from anita.eval.scoring import score_requests
from anita.jsonl import parse_object
from anita.sources import open_source

FEWSHOT_DELIMITER = "\n\n"
DEFAULT_SEED = 1234  # lm-evaluation-harness's default few-shot seed
METRICS = ("acc", "acc_norm", "acc_bytes")


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int
    where: str = field(default="", compare=False)  # "file:line", for error messages


# ------------------------------------------------------------------------------ task files
def parse_question(line: str, where: str) -> Question:
    """One JSONL row -> Question; AnitaError naming `where` (file:line) when it does not fit."""
    try:
        row = parse_object(line, 'an object {"context": str, "choices": [str, ...], "gold": int}')
    except ValueError as e:
        raise AnitaError(f"{where}: {e}") from None
    return question_from_row(row, where)


def question_from_row(row: dict, where: str) -> Question:
    """A decoded row -> Question; AnitaError naming `where` when it does not fit."""
    context, choices, gold = row.get("context"), row.get("choices"), row.get("gold")
    if not isinstance(context, str):
        raise AnitaError(f'{where}: "context" must be a string, got {context!r}')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise AnitaError(f'{where}: "choices" must be a list of at least 2 non-empty strings, got {choices!r}')
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise AnitaError(f'{where}: "gold" must be an index into "choices" (0..{len(choices) - 1}), got {gold!r}')
    return Question(context, tuple(choices), gold, where)


def read_questions(path) -> list[Question]:
    """All questions of a task source (blank lines skipped); any bad row is an error naming it."""
    source = open_source(path, what="task file")
    questions = []
    for rec in source.records():
        if rec.error:
            raise AnitaError(f"{rec.where}: {rec.error}")
        questions.append(question_from_row(rec.row, rec.where))
    if not questions:
        raise AnitaError(f"{source.label}: no questions")
    return questions


# -------------------------------------------------------------------------------- few-shot
def fewshot_contexts(questions: list[Question], k: int, seed: int = DEFAULT_SEED,
                     pool: list[Question] | None = None) -> list[str]:
    """The scored context of each question with K examples in front (the convention in the module
    docstring); without `pool`, examples come from `questions` themselves, never the question; from
    a `pool` (a few-shot file, a separate split), K as drawn."""
    if k < 0:
        raise AnitaError(f"num_fewshot must be >= 0, got {k}")
    if k == 0:
        return [q.context for q in questions]
    from_self = pool is None
    pool = questions if from_self else pool
    draw = k + 1 if from_self else k
    if len(pool) < draw:
        source = "the task has" if from_self else "the few-shot file has"
        raise AnitaError(f"{k}-shot needs at least {draw} examples, {source} {len(pool)}")
    rng = random.Random(seed)
    contexts = []
    for q in questions:
        shots = [ex for ex in rng.sample(pool, draw) if ex != q][:k] if from_self else rng.sample(pool, k)
        if len(shots) < k:  # the task repeats the question: draw from the questions without it
            others = [ex for ex in pool if ex != q]
            if len(others) < k:
                raise AnitaError(f"{q.where}: {k}-shot needs {k} other questions; the task has {len(others)}")
            shots = rng.sample(others, k)
        contexts.append("".join(ex.context + ex.choices[ex.gold] + FEWSHOT_DELIMITER for ex in shots) + q.context)
    return contexts


# -------------------------------------------------------------------------------- requests
def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = False):
    """(context ids, continuation ids) as the harness tokenizes a pair (steps 1-3 of the docstring)."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise AnitaError("empty context: the tokenizer has neither a BOS nor an EOS token to stand for it")
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        if continuation_ids[:1] == [prefix]:  # the continuation brings its own BOS: it is the context
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return context_ids, whole[len(context_ids):]


def truncate_left(context_ids: list[int], continuation_ids: list[int], max_len: int) -> list[int]:
    """The context the model reads when context + continuation[:-1] is cut to its last max_len tokens."""
    if len(context_ids) + len(continuation_ids) - 1 <= max_len:
        return context_ids
    return (context_ids + continuation_ids)[-(max_len + 1):][:-len(continuation_ids)]


def question_requests(tokenizer, context: str, q: Question, max_len: int, add_special_tokens: bool = False):
    """One (context ids, continuation ids) request per choice of `q`, scored after `context`."""
    requests = []
    for i, choice in enumerate(q.choices):
        context_ids, continuation_ids = encode_pair(tokenizer, context, choice, add_special_tokens)
        if not context_ids:
            raise AnitaError(f"{q.where}: the context is only whitespace; nothing for the model to read")
        if not continuation_ids:
            raise AnitaError(f"{q.where}: choice {i} {choice!r} adds no token after the context "
                             "(it merges into the context's last token)")
        if len(continuation_ids) > max_len:
            raise AnitaError(f"{q.where}: choice {i} is {len(continuation_ids)} tokens, longer than the "
                             f"model's {max_len} positions")
        requests.append((truncate_left(context_ids, continuation_ids, max_len), continuation_ids))
    return requests


# --------------------------------------------------------------------------------- metrics
def question_metrics(loglikelihoods: list[float], q: Question) -> dict[str, float]:
    """acc, acc_norm (per character) and acc_bytes (per UTF-8 byte) of one question."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)  # (choices,)
    n_chars = np.array([len(c) for c in q.choices], dtype=np.float64)
    n_bytes = np.array([len(c.encode("utf-8")) for c in q.choices], dtype=np.float64)
    return {"acc": float(np.argmax(ll) == q.gold),
            "acc_norm": float(np.argmax(ll / n_chars) == q.gold),
            "acc_bytes": float(np.argmax(ll / n_bytes) == q.gold)}


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (ddof 1) / √n; None for n < 2."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def aggregate(per_question: list[dict[str, float]]) -> dict:
    """{metric: mean, metric_stderr: ..., n: questions} over the questions' metrics."""
    out: dict = {}
    for name in METRICS:
        values = [m[name] for m in per_question]
        out[name] = float(np.mean(values))
        out[f"{name}_stderr"] = mean_stderr(values)
    out["n"] = len(per_question)
    return out


# ------------------------------------------------------------------------------ evaluation
def choice_loglikelihoods(model, tokenizer, questions: list[Question], contexts: list[str], batch_size: int = 8,
                          add_special_tokens: bool = False, progress: bool = False) -> list[list[float]]:
    """Per question, the log-likelihood of each choice after its context (one string per question)."""
    if batch_size < 1:
        raise AnitaError(f"batch_size must be >= 1, got {batch_size}")
    max_len = model.config.max_position_embeddings
    out = []
    for q, context in tqdm(list(zip(questions, contexts, strict=True)), desc="questions", disable=not progress):
        requests = question_requests(tokenizer, context, q, max_len, add_special_tokens)
        out.append([score.logprob for score in score_requests(model, requests, batch_size)])
    return out


def evaluate_mc(model, tokenizer, questions: list[Question], num_fewshot: int = 0,
                fewshot_pool: list[Question] | None = None, seed: int = DEFAULT_SEED, limit: int | None = None,
                batch_size: int = 8, add_special_tokens: bool = False, progress: bool = False) -> dict:
    """acc, acc_norm, acc_bytes, their stderrs and n over the first `limit` questions.

    Few-shot contexts are drawn for the questions in file order before the limit is applied, so
    the first N questions get the examples they get in a full run (as in the harness).
    """
    if limit is not None and limit < 1:
        raise AnitaError(f"limit must be >= 1, got {limit}")
    contexts = fewshot_contexts(questions, num_fewshot, seed, fewshot_pool)
    questions, contexts = questions[:limit], contexts[:limit]
    lls = choice_loglikelihoods(model, tokenizer, questions, contexts, batch_size, add_special_tokens, progress)
    result = aggregate([question_metrics(ll, q) for ll, q in zip(lls, questions)])
    result["num_fewshot"] = num_fewshot
    return result
