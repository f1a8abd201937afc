"""`anita eval`: multiple-choice accuracy scored as lm-evaluation-harness does (anita.eval.mc), or
the perplexity of a text (anita.eval.perplexity). Prints one JSON object on stdout.

    anita eval --model DIR [--adapter DIR] --task FILE [--fewshot-file FILE] [--num-fewshot K]
               [--batch-size N] [--limit N] [--seed S]
    anita eval --model DIR --perplexity FILE [--window N] [--stride N]
"""

from __future__ import annotations

import json
import sys

from anita.arguments import add_model_args
from anita.errors import AnitaError
from anita.eval.mc import evaluate_mc, read_questions
from anita.eval.perplexity import evaluate_perplexity, read_texts
from anita.lora import load_for_inference


def check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise AnitaError(f"{name} must be at least {minimum}, got {value}")


# Flags of --task with their defaults; None on the command line means "not given".
TASK_DEFAULTS = {"num_fewshot": 0, "batch_size": 8, "seed": 1234}


def run_mc(args, model, tokenizer, questions, pool) -> dict:
    return evaluate_mc(model, tokenizer, questions, num_fewshot=args.num_fewshot, fewshot_pool=pool,
                       seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                       add_special_tokens=args.add_bos, progress=sys.stderr.isatty())


def check_flags(args) -> None:
    """Refuse a flag that the chosen kind of evaluation would ignore, and out-of-range numbers; then
    fill in the defaults of the flags not given."""
    check_positive("--batch-size", args.batch_size)
    check_positive("--limit", args.limit)
    check_positive("--num-fewshot", args.num_fewshot, minimum=0)
    if args.perplexity:
        unused = [f"--{n.replace('_', '-')}" for n in ("fewshot_file", "num_fewshot", "batch_size", "limit", "seed")
                  if getattr(args, n) is not None] + (["--add-bos"] if args.add_bos else [])
        if unused:
            raise AnitaError(f"{', '.join(unused)}: only for --task; --perplexity scores every token of every "
                             "document, each started with BOS, one window at a time")
    else:
        unused = [f for f, v in [("--window", args.window), ("--stride", args.stride)] if v is not None]
        if unused:
            raise AnitaError(f"{', '.join(unused)}: only for --perplexity; --task scores each choice after its "
                             "whole context")
        if args.fewshot_file and not args.num_fewshot:
            raise AnitaError("--fewshot-file: examples are drawn from it only with --num-fewshot K > 0")
    for name, default in TASK_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def run_eval(args) -> int:
    check_flags(args)
    # Read the data before the model, so a bad row fails in a second, not after loading.
    if args.task:
        questions = read_questions(args.task)
        pool = read_questions(args.fewshot_file) if args.fewshot_file else None
    else:
        texts = read_texts(args.perplexity)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    if args.task:
        result = run_mc(args, model, tokenizer, questions, pool)
    else:
        result = evaluate_perplexity(model, tokenizer, texts, window=args.window, stride=args.stride)
    print(json.dumps(result, allow_nan=False))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy (lm-evaluation-harness scoring) or perplexity")
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", metavar="FILE", help='JSONL, one {"context", "choices", "gold"} per line')
    what.add_argument("--perplexity", metavar="FILE", help='a text file, or JSONL with one {"text"} per line')
    p.add_argument("--fewshot-file", metavar="FILE", help="few-shot examples (same format as --task); "
                   "default: the task's other questions")
    p.add_argument("--num-fewshot", type=int, help="examples before each question (default 0)")
    p.add_argument("--batch-size", type=int, help="choices scored per forward pass (default 8)")
    p.add_argument("--limit", type=int, help="score only the first N questions (default: all)")
    p.add_argument("--seed", type=int, help="few-shot sampling seed (default 1234, the harness's)")
    p.add_argument("--add-bos", action="store_true",
                   help="tokenize with the tokenizer's special tokens (BOS for Llama 3), as lm-eval-harness "
                        "with add_bos_token=True; default off, as the harness up to v0.4.9")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="perplexity stride in tokens (default: half the window)")
    p.set_defaults(func=run_eval)
