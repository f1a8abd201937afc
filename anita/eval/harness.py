"""anita as an lm-evaluation-harness model: `AnitaLM`, registered under the name "anita".

lm-evaluation-harness (EleutherAI, Gao et al. 2023) produced ANITA's published numbers
(docs/recipe.md). `AnitaLM` lets a harness task run on an anita model — an NF4 base with a LoRA
adapter, say — without merging it or switching to transformers, and gives the numbers the harness's
own `hf` model (`lm_eval/models/huggingface.py`, `HFLM`) gives on the same checkpoint:

- `loglikelihood`: the pair is tokenized as `HFLM` does (`anita.eval.mc.encode_pair`: trailing
  context spaces move to the continuation, the continuation is cut from the tokenization of the
  whole string, an empty context is BOS), cut from the left to `max_length`, and scored by
  `anita.eval.scoring.score_requests` — the choices of a question share one pass over their context.
- `loglikelihood_rolling`: BOS + the document's tokens in the harness's rolling windows
  (`anita.eval.perplexity.harness_windows`), all windows of all documents batched.
- `generate_until`: `anita.model.stream_generate` (KV cache, left-padded batches, greedy unless
  `do_sample`), the context cut from the left to max_length − max_gen_toks, stopping at the model's
  end-of-sequence ids (generation_config.json, as transformers' `generate`) or once every row's text
  holds one of `until`; the text is then cut at the first stop string, as `HFLM` does.

With lm-eval's `apply_chat_template` (and `fewshot_as_multiturn`, `system_instruction`) the harness
builds each prompt as a chat and `AnitaLM.apply_chat_template` renders it as `HFLM` does, with the
checkpoint's template (or the Llama 3 format anita writes out); `batch_size="auto"` / `"auto:N"`
finds the batch as `HFLM` does (anita.eval.batch_size); `run_tasks` writes lm-eval's results files
with lm-eval's own `EvaluationTracker` (`--output_path`, `--log_samples`).

Special tokens follow `HFLM` (lm-eval 0.4.13): with `add_bos_token=None` (the default) a string is
encoded with the tokenizer's own special tokens (a BOS for Llama 3; none for SmolLM2), `True`/`False`
force them on/off, and a string that already starts with the BOS text gets none.

lm-eval is an optional extra (`pip install "anita[eval]"`): without it this module still imports,
and `AnitaLM(...)` raises a one-line `AnitaError` saying what to install. lm-eval 0.4.13 finds models
only in its own table or among classes registered by code already imported, and reads no
entry points, so a bare `lm_eval --model anita` cannot find this class; `anita eval --tasks`,
`python -m anita.eval run --model anita ...` (lm-eval's own command line with anita
registered) and `import anita.eval.harness` before `lm_eval.simple_evaluate(model="anita", ...)` can.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import warnings
from pathlib import Path

from anita.errors import AnitaError
from anita.eval.batch_size import (
    DEFAULT_MAX_BATCH_SIZE,
    auto_batch_size,
    parse_batch_size,
)
from anita.eval.mc import encode_pair, truncate_left
from anita.eval.perplexity import harness_windows, rolling_nlls
from anita.eval.scoring import score_requests
from anita.hub import resolve_model_dir
from anita.lora import load_for_inference
from anita.model import stream_generate

try:  # the optional extra
    import lm_eval.models  # noqa: F401  lm-eval's own models first: `get_model` lists them only into an empty
    from lm_eval.api.model import LM  # registry, so registering "anita" before would hide "hf" and the rest
    from lm_eval.api.registry import register_model
except ImportError:  # anita still imports; AnitaLM(...) says what to install
    LM, register_model = object, None

INSTALL = 'lm-evaluation-harness is not installed: pip install "anita[eval]"'
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}
MAX_GEN_TOKS_ALIASES = ("max_new_tokens", "max_tokens", "max_completion_tokens")  # HFLM reads these as max_gen_toks
DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks


def require_lm_eval() -> None:
    if register_model is None:
        raise AnitaError(INSTALL)


def positive_int(name: str, value) -> int:
    """An int from a model argument (the harness passes them as strings), at least 1."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise AnitaError(f"AnitaLM: {name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise AnitaError(f"AnitaLM: {name} must be at least 1, got {value!r}")
    return number


def optional_bool(name: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise AnitaError(f"AnitaLM: {name} must be true or false, got {value!r}")


def generation_stop_ids(model_dir, config) -> list[int]:
    """The ids that end a generation, as transformers' `generate` reads them: generation_config.json's
    eos_token_id when the checkpoint has one, else config.json's."""
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos))


class HarnessRequests:
    """anita's answers to the harness's three request types, on plain argument tuples (what an
    `Instance.args` holds), so they can be used and tested without lm-eval installed."""

    def __init__(self, model, tokenizer, stop_ids: list[int], batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_gen_toks, self.add_bos_token = max_gen_toks, add_bos_token
        self.max_length = model.config.max_position_embeddings if max_length is None else max_length
        # A number, or None with `auto_times` (batch_size="auto:N"): found per request type and part.
        self.batch_size, self.auto_times = parse_batch_size(batch_size, "AnitaLM: batch_size")
        self.max_batch_size = max_batch_size
        self.batch_sizes: dict[str, int] = {}  # what `auto` found, by request type (and part)

    # ------------------------------------------------------------------------ tokens
    @property
    def prefix_token_id(self) -> int:
        """What an empty context and every document start with: BOS, else EOS (HFLM)."""
        tok = self.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if prefix is None:
            raise AnitaError("the tokenizer has neither a BOS nor an EOS token")
        return prefix

    def special_tokens(self, text: str) -> bool:
        """add_special_tokens for `text`, as HFLM.tok_encode decides it."""
        if text.startswith(self.tokenizer.decode([self.prefix_token_id])):
            return False  # the text brings its own BOS
        return True if self.add_bos_token is None else self.add_bos_token

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.special_tokens(text))

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """A chat (the harness's few-shot turns and question) as the prompt string, as `HFLM` renders it:
        with the checkpoint's template, ending in the assistant's header, or — add_generation_prompt
        False, a task's gen_prefix — inside the last message, to be continued. A template that refuses
        the system role gets the chat without it (HFLM's fallback, with its warning)."""
        def render(chat):
            return self.tokenizer.render_chat(chat, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except AnitaError as e:
            if not any(m.get("role") == "system" for m in chat_history):
                raise
            print(f"anita: warning: {e}; the chat is rendered without its system message", file=sys.stderr)
            return render([m for m in chat_history if m.get("role") != "system"])

    # -------------------------------------------------------------------------- batches
    def rows_per_batch(self, kind: str, length: int) -> int:
        """The batch size given, or (auto) the largest that fits rows of `length` tokens."""
        if self.batch_size is not None:
            return self.batch_size
        self.batch_sizes[kind] = auto_batch_size(self.model, length, self.max_batch_size)
        return self.batch_sizes[kind]

    def parts(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Request indices in the parts that get a batch size each: all in one, or (auto:N) longest
        first in N about equal parts (HFLM's schedule), the requests of one context kept together
        so they still share its pass."""
        if self.auto_times in (None, 1):
            return [list(range(len(pairs)))]
        groups: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            groups.setdefault(tuple(context), []).append(i)
        longest = {key: max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx) for key, idx in groups.items()}
        size, out = -(-len(pairs) // self.auto_times), [[]]
        for key in sorted(groups, key=lambda k: -longest[k]):
            if len(out[-1]) >= size:
                out.append([])
            out[-1] += groups[key]
        return out

    # ------------------------------------------------------------------- the three requests
    def loglikelihood(self, args: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context, continuation)."""
        pairs = []
        for context, continuation in args:
            ctx, cont = encode_pair(self.tokenizer, context, continuation, self.special_tokens(context))
            if not cont:
                raise AnitaError(f"loglikelihood: continuation {continuation!r} adds no token after {context[-40:]!r}")
            if len(cont) > self.max_length:
                raise AnitaError(f"loglikelihood: continuation of {len(cont)} tokens, longer than max_length "
                                 f"{self.max_length}")
            pairs.append((truncate_left(ctx, cont, self.max_length), cont))
        if not pairs:
            return []
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for n, part in enumerate(self.parts(pairs)):
            rows = self.rows_per_batch(f"loglikelihood {n}", max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in part))
            scores = score_requests(self.model, [pairs[i] for i in part], rows, greedy=True, progress=progress)
            for i, s in zip(part, scores):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, texts: list[str], progress: bool = False) -> list[float]:
        """log p(text) per text, BOS first, in the harness's windows."""
        documents = [[self.prefix_token_id] + self.tok_encode(text) for text in texts]
        nlls = rolling_nlls(self.model, documents, lambda n: harness_windows(n, self.max_length),
                            self.rows_per_batch("loglikelihood_rolling", self.max_length), progress)
        return [-nll for nll in nlls]

    def generate_until(self, args: list[tuple[str, dict]]) -> list[str]:
        """The generated text per (context, gen_kwargs), batched per gen_kwargs."""
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        rows = self.rows_per_batch("generate_until", self.max_length) if args else 1
        for idx in groups.values():
            settings = self.generation_settings(args[idx[0]][1])
            encoded = {i: self.tok_encode(args[i][0]) for i in idx}
            idx.sort(key=lambda i: -len(encoded[i]))  # longest first, as HFLM, so a batch holds similar lengths
            for start in range(0, len(idx), rows):
                batch = idx[start:start + rows]
                for i, text in zip(batch, self.generate_batch([encoded[i] for i in batch], **settings)):
                    out[i] = text
        return out

    # ------------------------------------------------------------------------ generation
    def generation_settings(self, gen_kwargs: dict) -> dict:
        """until, max_gen_toks and sampling settings from a request's gen_kwargs (HFLM's defaults:
        greedy unless do_sample or a temperature > 0; do_sample without a temperature samples at 1)."""
        gen_kwargs = dict(gen_kwargs)
        for alias in MAX_GEN_TOKS_ALIASES:
            if alias in gen_kwargs:
                gen_kwargs.setdefault("max_gen_toks", gen_kwargs.pop(alias))
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise AnitaError(f"generate_until: unsupported generation argument(s) {', '.join(unknown)}; "
                             f"anita takes {', '.join(sorted(GEN_KWARGS))}")
        until = gen_kwargs.get("until") or []
        until = [stop for stop in ([until] if isinstance(until, str) else list(until)) if stop]  # "" stops nothing
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = gen_kwargs.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        max_gen_toks = positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        return {"until": until, "max_gen_toks": max_gen_toks, "temperature": (temperature or 1.0) if do_sample else 0.0,
                "top_k": (gen_kwargs.get("top_k") or None) if do_sample else None,  # 0: transformers' "no cut"
                "top_p": gen_kwargs.get("top_p") if do_sample else None}

    def generate_batch(self, prompts: list[list[int]], until: list[str], max_gen_toks: int, **sampling) -> list[str]:
        """Generate for a batch of prompts until every row has hit an EOS id or a stop string."""
        room = self.max_length - max_gen_toks
        if room < 1:
            raise AnitaError(f"generate_until: max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                             f"max_length {self.max_length}")
        prompts = [p[-room:] for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in stream_generate(self.model, prompts, max_gen_toks, self.stop_ids, pad_id=self.tokenizer.pad_id,
                                    **sampling):
            for i, token in enumerate(step):
                if token is None or done[i]:  # stopped by an EOS id, or by a stop string before
                    done[i] = True
                    continue
                new[i].append(token)
                done[i] = any(stop in self.tokenizer.decode(new[i], skip_special_tokens=True) for stop in until)
            if all(done):
                break
        return [cut_at_stops(self.tokenizer.decode(ids, skip_special_tokens=True), until) for ids in new]


class AnitaLM(LM):
    """An anita checkpoint (+ LoRA adapter, + NF4) behind lm-evaluation-harness's `LM` interface."""

    def __init__(self, pretrained: str, adapter: str | None = None, quantize: str | None = None,
                 dtype: str = "float32", device: str = "cpu", batch_size=8, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=None, progress=True,
                 max_batch_size=DEFAULT_MAX_BATCH_SIZE):
        require_lm_eval()
        super().__init__()
        parse_batch_size(batch_size, "AnitaLM: batch_size")  # arguments first: a typo fails before loading
        max_length = None if max_length is None else positive_int("max_length", max_length)
        max_gen_toks, add_bos_token = positive_int("max_gen_toks", max_gen_toks), optional_bool("add_bos_token",
                                                                                               add_bos_token)
        max_batch_size = positive_int("max_batch_size", max_batch_size)
        model, tokenizer = load_for_inference(pretrained, adapter, dtype, device, quantize)
        stop_ids = generation_stop_ids(resolve_model_dir(pretrained), model.config)
        self.requests = HarnessRequests(model, tokenizer, stop_ids, batch_size, max_length, max_gen_toks,
                                        add_bos_token, max_batch_size)
        self._device = model.device
        self.pretrained, self.adapter, self.batch_size = str(pretrained), adapter, batch_size  # as given: 8, auto:4
        self.progress = optional_bool("progress", progress) is not False  # a bar of requests on stderr

    @property
    def max_length(self) -> int:
        return self.requests.max_length

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        answers = self.requests.loglikelihood([r.args for r in requests], progress=self.progress and not disable_tqdm)
        return self.answer("loglikelihood", requests, answers)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        return self.answer("loglikelihood_rolling", requests,
                           self.requests.loglikelihood_rolling(texts, progress=self.progress and not disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.answer("generate_until", requests, self.requests.generate_until([r.args for r in requests]))

    def answer(self, kind: str, requests, answers: list) -> list:
        for r, a in zip(requests, answers):  # the harness's --use_cache records answers through this hook
            self.cache_hook.add_partial(kind, r.args, a)
        return answers

    # ------------------------------------------------------------------- chat templates
    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """What the harness calls with --apply_chat_template (HarnessRequests.apply_chat_template)."""
        return self.requests.apply_chat_template(chat_history, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template the prompts are rendered with, as the harness logs it: the checkpoint's Jinja
        template, or "llama3" for the Llama 3 format anita writes out (a vocabulary without a
        shipped template). anita renders the default template only: a template name is refused."""
        if chat_template is False or chat_template is None:
            return None
        chat_flags(chat_template, None, None)  # refuses a template name
        tok = self.requests.tokenizer
        if tok.chat_format is None:
            raise AnitaError(f"apply_chat_template: {self.pretrained} ships no chat template and is not a Llama 3 "
                             "vocabulary")
        return tok.chat_template if tok.chat_format == "template" else "llama3"

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    @property
    def batch_sizes(self) -> dict[str, int]:
        """The batch sizes batch_size=auto found (the harness's results config lists them)."""
        return self.requests.batch_sizes

    def get_model_info(self) -> dict:
        return {"pretrained": self.pretrained, "adapter": self.adapter, "max_length": self.max_length}


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first occurrence of each stop string in turn (HFLM's post-processing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


if register_model is not None:
    register_model("anita")(AnitaLM)


# ------------------------------------------------------------------------------ running tasks
# lm-eval's task machinery (datasets and all) is imported where tasks run, not at import time, so
# the `anita` command starts as fast without it.
def task_manager(names: list[str], include_path=None):
    """lm-eval's `TaskManager` for `names`: over the YAML files under `include_path` alone when they
    hold every name (indexing lm-eval's own ~15,000 tasks takes seconds), else over both."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).exists():
            raise AnitaError(f"{include_path}: no such task directory (--include-path)")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=None if include_path is None else str(include_path))


def check_tasks(manager, names: list[str]) -> None:
    """Refuse, in one line, a task lm-eval does not know or whose data it cannot load — before any
    model is loaded. (The data are loaded again by `run_tasks`, from the datasets cache.)"""
    from lm_eval.tasks import get_task_dict

    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise AnitaError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists them, "
                         "--include-path adds a directory of task YAML files")
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict: the loader every 0.4 has
                get_task_dict([name], manager)
        except Exception as e:  # datasets and the Hub raise many types; the message says what happened
            hint = (f" ({' and '.join(offline)} set: only data already in the datasets cache can be read)" if offline
                    else "")
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AnitaError(f"task {name}: lm-eval cannot load its data: {first_line}{hint}") from None


def chat_flags(apply_chat_template, system_instruction: str | None, fewshot_as_multiturn: bool | None) -> bool:
    """fewshot_as_multiturn as lm-eval's command line settles it — on by default with a chat template,
    refused without one — after refusing what anita cannot honour: a named template (anita renders
    the checkpoint's default one) and an empty system instruction (which lm-eval drops silently)."""
    if apply_chat_template not in (True, False, None):
        raise AnitaError(f"--apply_chat_template {apply_chat_template!r}: anita renders the checkpoint's default chat "
                         "template; named templates are not supported (give the flag alone)")
    if system_instruction is not None and not system_instruction.strip():
        raise AnitaError("--system_instruction is empty; give its text (lm-eval would silently drop it)")
    if apply_chat_template:
        return True if fewshot_as_multiturn is None else fewshot_as_multiturn
    if fewshot_as_multiturn:
        raise AnitaError("--fewshot_as_multiturn needs --apply_chat_template (few-shot examples become chat turns "
                         "only in a chat; lm-eval refuses it too)")
    return False


def run_tasks(lm, manager, names: list[str], num_fewshot: int | None = None, limit: int | None = None,
              seed: int = 1234, *, apply_chat_template: bool | str = False, system_instruction: str | None = None,
              fewshot_as_multiturn: bool | None = None, log_samples: bool = False, output_path=None,
              model_args: dict | None = None) -> dict:
    """`lm_eval.simple_evaluate` on `lm` (an `AnitaLM`): the harness's results dictionary (with
    "samples" when `log_samples`). `seed` is the few-shot sampling seed (the harness's default 1234).
    The chat settings are lm-eval's (`chat_flags`); with `output_path` lm-eval's own
    `EvaluationTracker` writes its results JSON (and with `log_samples` a samples JSONL per task) in
    its layout: DIR/<model_args' pretrained, sanitized>/results_<time>.json (`results_file`)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    multiturn = chat_flags(apply_chat_template, system_instruction, fewshot_as_multiturn)
    if apply_chat_template:
        lm.chat_template(True)  # a checkpoint without a template fails here, before any request
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path is not None else None
    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress; stdout is for the results
        results = simple_evaluate(model=lm, model_args=model_args or {}, tasks=names, task_manager=manager,
                                  num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                                  batch_size=getattr(lm, "batch_size", None),  # only logged (as lm-eval does)
                                  fewshot_random_seed=seed, evaluation_tracker=tracker,
                                  apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                                  fewshot_as_multiturn=multiturn)
        if tracker is not None:
            save_results(tracker, results, log_samples)
    return results


def save_results(tracker, results: dict, log_samples: bool) -> None:
    """What `lm_eval --output_path` writes, by its tracker (which edits what it is given: it gets copies)."""
    results = copy.deepcopy(results)
    samples = results.pop("samples", None)  # there only with log_samples
    tracker.save_results_aggregated(results=results, samples=samples)
    results_file(tracker)  # the tracker only logs a failure to write
    for task in results["configs"] if log_samples else []:
        tracker.save_results_samples(task_name=task, samples=samples[task])


def results_file(tracker) -> Path:
    """The results JSON the tracker wrote (lm-eval 0.4.13's naming): DIR/<model>/results_<time>.json,
    or NAME_<time>.json beside an output_path NAME.json."""
    path, date = Path(tracker.output_path), getattr(tracker, "date_id", None)
    file = (path.with_name(f"{path.stem}_{date}.json") if path.suffix == ".json"
            else path / str(tracker.general_config_tracker.model_name_sanitized) / f"results_{date}.json")
    if date is None or not file.is_file():
        raise AnitaError(f"{tracker.output_path}: lm-eval could not write its results there")
    return file


def results_table(results: dict) -> str:
    """The harness's own markdown table of a results dictionary."""
    from lm_eval.utils import make_table

    return make_table(results)
