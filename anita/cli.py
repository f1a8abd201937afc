"""The `anita` command line: one sub-command per stage of the recipe.

Each sub-command lives beside the code it drives, in a `cli.py` with `register(subparsers)` that
adds its parser and sets `func`; a `cli.py` parses arguments and calls library functions, and
only this module imports one. `anita demo`, whose library is the single module `anita.demo`, is
parsed here. Bad input (`AnitaError`) becomes one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from anita.demo import run_demo
from anita.dpo import cli as dpo_cli
from anita.errors import AnitaError, Interrupted
from anita.eval import cli as eval_cli
from anita.export import cli as export_cli
from anita.lora import cli as lora_cli
from anita.model import cli as model_cli
from anita.train import cli as train_cli


# ------------------------------------------------------------------ anita demo (whose library is anita.demo)
def run_demo_command(args) -> int:
    run_demo(args.output, args.model, args.device, args.quick)
    return 0


def register_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole ANITA recipe in miniature, offline, and write a report")
    p.add_argument("--model", help="HF-layout directory or Hub id (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--output", default="anita-demo", help="output directory (default: anita-demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a seconds-long run on a tiny random model (for tests)")
    p.set_defaults(func=run_demo_command)


# generate, convert-gguf / export-gguf / eval / merge / sft / dpo / demo
REGISTER = [model_cli.register, export_cli.register, eval_cli.register, lora_cli.register, train_cli.register, dpo_cli.register,
            register_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anita", description="The LLaMAntino-3-ANITA recipe, readable.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return parser


def resume_command(argv: list[str] | None) -> str:
    """The command that was run, with --resume added: what continues a stopped run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["anita", *args, *([] if "--resume" in args else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its one-line error (exit 2), or --help (0)
        return e.code
    try:
        return args.func(args) or 0
    except AnitaError as e:
        print(f"anita: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"anita: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a run stopped by SIGTERM/SIGINT after saving (anita.train.signals)
        print(f"anita: {e}\nresume with: {resume_command(argv)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("anita: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
