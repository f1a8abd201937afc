"""`anita eval`: multiple-choice accuracy scored as lm-evaluation-harness does (anita.eval.mc), or
the perplexity of a text (anita.eval.perplexity), printed as one JSON object; or lm-evaluation-harness
tasks run on the anita model (anita.eval.harness), or the paper's Italian suite beside its published
numbers (anita.eval.suite), printed as a table.

    anita eval --model DIR [--adapter DIR] --task FILE [--fewshot-file FILE] [--num-fewshot K]
               [--batch-size N] [--limit N] [--seed S]
    anita eval --model DIR --perplexity FILE [--window N] [--stride N]
    anita eval --model DIR [--adapter DIR] [--quantize nf4] --tasks arc_it,hellaswag_it [--num-fewshot K]
               [--limit N] [--include-path DIR] [--output results.json] [--batch-size N|auto|auto:N]
               [--apply_chat_template [--fewshot_as_multiturn [BOOL]]] [--system_instruction TEXT]
               [--output_path DIR [--log_samples]]
    anita eval --model DIR --suite anita [--limit N] [--output results.json]

lm-eval's own spellings of the flags (--num_fewshot, --batch_size, --include_path, ...) are accepted
beside anita's (--num-fewshot, ...).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from anita.arguments import add_model_args
from anita.errors import AnitaError
from anita.eval.batch_size import parse_batch_size
from anita.eval.harness import (
    AnitaLM,
    chat_flags,
    check_tasks,
    results_table,
    run_tasks,
    task_manager,
)
from anita.eval.mc import evaluate_mc, read_questions
from anita.eval.perplexity import evaluate_perplexity, read_texts
from anita.eval.suite import by_shots, get_suite, suite_scores, suite_table
from anita.files import write_json
from anita.lora import load_for_inference


def check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise AnitaError(f"{name} must be at least {minimum}, got {value}")


# Flags of --task with their defaults; None on the command line means "not given".
TASK_DEFAULTS = {"num_fewshot": 0, "batch_size": 8, "seed": 1234}
# Flags of --tasks alone (lm-eval's chat and output settings), as the user spells them.
TASKS_ONLY = {"apply_chat_template": "--apply_chat_template", "system_instruction": "--system_instruction",
              "fewshot_as_multiturn": "--fewshot_as_multiturn", "output_path": "--output_path",
              "log_samples": "--log_samples"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def run_mc(args, model, tokenizer, questions, pool) -> dict:
    return evaluate_mc(model, tokenizer, questions, num_fewshot=args.num_fewshot or 0, fewshot_pool=pool,
                       seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                       add_special_tokens=args.add_bos, progress=args.progress)


def check_flags(args) -> None:
    """Refuse a flag that the chosen kind of evaluation would ignore, and out-of-range numbers; then
    fill in the defaults of the flags not given."""
    check_positive("--limit", args.limit)
    check_positive("--num-fewshot", args.num_fewshot, minimum=0)
    check_positive("--max-batch-size", args.max_batch_size)
    if args.batch_size is not None:
        rows, auto = parse_batch_size(args.batch_size, "--batch-size")
        args.batch_size = rows if rows is not None else args.batch_size
        if auto and not (args.tasks or args.suite):
            raise AnitaError(f"--batch-size {args.batch_size}: only for --tasks and --suite; give a number")
    if args.tasks or args.suite:
        check_harness_flags(args)
        args.batch_size = TASK_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
        args.seed = TASK_DEFAULTS["seed"] if args.seed is None else args.seed
        return  # --num-fewshot None: each task's own
    tasks_only = tasks_only_flags(args)
    if tasks_only:
        raise AnitaError(f"{', '.join(tasks_only)}: only for --tasks")
    harness_only = [f for f, v in [("--include-path", args.include_path), ("--output", args.output),
                                   ("--max-batch-size", args.max_batch_size)] if v is not None]
    if harness_only:
        raise AnitaError(f"{', '.join(harness_only)}: only for --tasks and --suite")
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


def check_harness_flags(args) -> None:
    unused = [f for f, v in [("--fewshot-file", args.fewshot_file), ("--window", args.window),
                             ("--stride", args.stride)] if v is not None]
    if args.suite and args.num_fewshot is not None:
        unused.append("--num-fewshot")
    if unused:
        raise AnitaError(f"{', '.join(unused)}: not for --tasks/--suite (the harness task sets its few-shot "
                         "examples and windows; --suite uses the paper's shot counts)")
    if args.output and Path(args.output).exists():
        raise AnitaError(f"{args.output}: exists; choose another --output (nothing is overwritten)")
    if args.output and not Path(args.output).parent.is_dir():
        raise AnitaError(f"{args.output}: its directory does not exist")
    if args.max_batch_size is not None and not str(args.batch_size).startswith("auto"):
        raise AnitaError("--max-batch-size: only with --batch-size auto (where the search starts)")
    check_chat_and_output_flags(args)


def tasks_only_flags(args) -> list[str]:
    return [flag for name, flag in TASKS_ONLY.items() if getattr(args, name) not in (None, False)]


def check_chat_and_output_flags(args) -> None:
    """lm-eval's chat and output flags, for --tasks: settled as lm-eval's command line settles them."""
    if args.suite:
        if tasks_only_flags(args):
            raise AnitaError(f"{', '.join(tasks_only_flags(args))}: only for --tasks (--suite runs the paper's "
                             "settings)")
        return
    multiturn = args.fewshot_as_multiturn
    if multiturn is not None:
        if str(multiturn).lower() not in TRUE + FALSE:
            raise AnitaError(f"--fewshot_as_multiturn {multiturn!r}: expected true or false (or the flag alone)")
        multiturn = str(multiturn).lower() in TRUE
    args.fewshot_as_multiturn = chat_flags(args.apply_chat_template, args.system_instruction, multiturn)
    if args.log_samples and args.output_path is None:
        raise AnitaError("--log_samples needs --output_path (lm-eval writes the samples there)")
    if args.output_path is not None:
        check_output_path(Path(args.output_path))


def check_output_path(path: Path) -> None:
    """lm-eval writes DIR/<model>/results_<time>.json (or NAME_<time>.json beside NAME.json), making
    the folders: the path must be a folder or not exist yet, under a folder anita may write in."""
    if path.suffix != ".json" and path.exists() and not path.is_dir():
        raise AnitaError(f"--output_path {path}: exists and is not a folder")
    existing = path.parent if path.suffix == ".json" else path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise AnitaError(f"--output_path {path}: {existing} is not a folder anita can write in")


def harness_model_args(args) -> dict:
    """The AnitaLM arguments of the command line (also logged as the results' model_args)."""
    extra = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
    return {"pretrained": args.model, "adapter": args.adapter, "quantize": args.quantize, "dtype": args.dtype,
            "device": args.device, "batch_size": args.batch_size, "add_bos_token": True if args.add_bos else None,
            **extra}


def harness_model(args) -> AnitaLM:
    return AnitaLM(**harness_model_args(args), progress=args.progress)


def run_harness(args) -> int:
    """--tasks: the harness's table; --suite: the paper's table. Tasks are checked before the model loads."""
    suite = get_suite(args.suite) if args.suite else None
    names = [t.task for t in suite] if suite else [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise AnitaError("--tasks: give at least one task name, comma-separated")
    manager = task_manager(names, args.include_path)
    check_tasks(manager, names)
    lm = harness_model(args)
    if suite:
        runs = [run_tasks(lm, manager, group, shots, args.limit, args.seed) for shots, group in by_shots(suite).items()]
        merged = {name: row for run in runs for name, row in run["results"].items()}
        scores = suite_scores(merged, suite)
        print(suite_table(scores, suite, Path(args.model).name or args.model))
        output = {"suite": args.suite, "scores": scores, "runs": runs}
    else:
        output = run_tasks(lm, manager, names, args.num_fewshot, args.limit, args.seed,
                           apply_chat_template=bool(args.apply_chat_template), system_instruction=args.system_instruction,
                           fewshot_as_multiturn=args.fewshot_as_multiturn, log_samples=args.log_samples,
                           output_path=args.output_path, model_args=harness_model_args(args))
        output.pop("samples", None)  # in --output_path's samples files
        print(results_table(output))
    if args.output:
        write_json(args.output, json.loads(json.dumps(output, default=str)))
    return 0


def run_eval(args) -> int:
    check_flags(args)
    if args.tasks or args.suite:
        return run_harness(args)
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
        result = evaluate_perplexity(model, tokenizer, texts, window=args.window, stride=args.stride,
                                     progress=args.progress)
    print(json.dumps(result, allow_nan=False))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy (lm-evaluation-harness scoring) or perplexity")
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", metavar="FILE", help='JSONL, one {"context", "choices", "gold"} per line')
    what.add_argument("--perplexity", metavar="FILE", help='a text file, or JSONL with one {"text"} per line')
    what.add_argument("--tasks", metavar="A,B", help="lm-evaluation-harness tasks, comma-separated, run on the anita "
                      'model (pip install "anita[eval]")')
    what.add_argument("--suite", metavar="NAME", help="the paper's Italian suite (anita: arc_it, hellaswag_it, "
                      "m_mmlu_it) beside the published numbers")
    p.add_argument("--fewshot-file", metavar="FILE", help="few-shot examples (same format as --task); "
                   "default: the task's other questions")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int,
                   help="examples before each question (default 0; --tasks: the task's)")
    p.add_argument("--batch-size", "--batch_size", metavar="N",
                   help="choices scored per forward pass (default 8); --tasks/--suite also take auto (the largest "
                        "batch that fits, found per request type; docs/eval.md) or auto:N (found N times over the "
                        "loglikelihood requests, longest first), as lm-eval's hf model")
    p.add_argument("--max-batch-size", "--max_batch_size", type=int,
                   help="with --batch-size auto: the batch the search starts from (default 64, lm-eval's)")
    p.add_argument("--limit", type=int, help="score only the first N questions (default: all)")
    p.add_argument("--seed", type=int, help="few-shot sampling seed (default 1234, the harness's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar on stderr, as training does (default: on)")
    p.add_argument("--add-bos", action="store_true",
                   help="--task: tokenize with the tokenizer's special tokens (BOS for Llama 3), as the harness "
                        "with add_bos_token=True (default off, the harness up to v0.4.9); --tasks/--suite add them by "
                        "default, as lm-eval 0.4.13 does")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="perplexity stride in tokens (default: half the window)")
    p.add_argument("--include-path", "--include_path", metavar="DIR",
                   help="--tasks: a directory of task YAML files to add")
    p.add_argument("--output", metavar="FILE", help="--tasks/--suite: write the harness's results as JSON")
    add_chat_and_output_args(p)


def add_chat_and_output_args(p) -> None:
    """lm-eval's flags for chat models and for its results files (--tasks only), in both spellings."""
    p.add_argument("--apply-chat-template", "--apply_chat_template", nargs="?", const=True, metavar="NAME",
                   help="--tasks: render each prompt with the checkpoint's chat template, as lm-eval's hf model "
                        "(multiple choice: the choices follow the assistant header, without the target delimiter); "
                        "the default template only, a NAME is refused")
    p.add_argument("--system-instruction", "--system_instruction", metavar="TEXT",
                   help="--tasks: a system message before each prompt (with a chat template), else text put as is "
                        "before it (lm-eval's rule: end it with a space or newline)")
    p.add_argument("--fewshot-as-multiturn", "--fewshot_as_multiturn", nargs="?", const="true", metavar="BOOL",
                   help="--tasks: few-shot examples as user/assistant turns (default with --apply_chat_template, "
                        "which it needs); false: one user turn holding them all")
    p.add_argument("--output-path", "--output_path", metavar="DIR",
                   help="--tasks: lm-eval's results JSON in its layout, DIR/<model>/results_<time>.json")
    p.add_argument("--log-samples", "--log_samples", action="store_true",
                   help="--tasks: also every request and answer, DIR/<model>/samples_<task>_<time>.jsonl "
                        "(needs --output_path)")
    p.set_defaults(func=run_eval)
