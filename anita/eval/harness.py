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
import json
import os
import sys
import warnings
from pathlib import Path

from anita.errors import AnitaError
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

    def __init__(self, model, tokenizer, stop_ids: list[int], batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.batch_size, self.max_gen_toks, self.add_bos_token = batch_size, max_gen_toks, add_bos_token
        self.max_length = model.config.max_position_embeddings if max_length is None else max_length

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
        scores = score_requests(self.model, pairs, self.batch_size, greedy=True, progress=progress)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, texts: list[str], progress: bool = False) -> list[float]:
        """log p(text) per text, BOS first, in the harness's windows."""
        documents = [[self.prefix_token_id] + self.tok_encode(text) for text in texts]
        nlls = rolling_nlls(self.model, documents, lambda n: harness_windows(n, self.max_length), self.batch_size,
                            progress)
        return [-nll for nll in nlls]

    def generate_until(self, args: list[tuple[str, dict]]) -> list[str]:
        """The generated text per (context, gen_kwargs), batched per gen_kwargs."""
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            settings = self.generation_settings(args[idx[0]][1])
            encoded = {i: self.tok_encode(args[i][0]) for i in idx}
            idx.sort(key=lambda i: -len(encoded[i]))  # longest first, as HFLM, so a batch holds similar lengths
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
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
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=None, progress=True):
        require_lm_eval()
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise AnitaError("AnitaLM: batch_size=auto is not supported; give a number of rows per forward pass")
        batch_size = positive_int("batch_size", batch_size)  # arguments first: a typo fails before loading
        max_length = None if max_length is None else positive_int("max_length", max_length)
        max_gen_toks, add_bos_token = positive_int("max_gen_toks", max_gen_toks), optional_bool("add_bos_token",
                                                                                               add_bos_token)
        model, tokenizer = load_for_inference(pretrained, adapter, dtype, device, quantize)
        stop_ids = generation_stop_ids(resolve_model_dir(pretrained), model.config)
        self.requests = HarnessRequests(model, tokenizer, stop_ids, batch_size, max_length, max_gen_toks,
                                        add_bos_token)
        self._device = model.device
        self.pretrained, self.adapter = str(pretrained), adapter
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

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

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


def run_tasks(lm, manager, names: list[str], num_fewshot: int | None = None, limit: int | None = None,
              seed: int = 1234) -> dict:
    """`lm_eval.simple_evaluate` on `lm` (an `AnitaLM`): the harness's results dictionary. `seed` is
    the few-shot sampling seed (the harness's default 1234)."""
    from lm_eval import simple_evaluate

    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress; stdout is for the results
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               log_samples=False, fewshot_random_seed=seed)


def results_table(results: dict) -> str:
    """The harness's own markdown table of a results dictionary."""
    from lm_eval.utils import make_table

    return make_table(results)
