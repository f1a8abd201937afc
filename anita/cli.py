"""The `anita` command line: one sub-command per stage of the recipe.

Each sub-command lives beside the code it drives, in a `cli.py` with `register(subparsers)` that
adds its parser and sets `func`; a `cli.py` parses arguments and calls library functions, and
only this module imports one. Bad input (`AnitaError`) becomes one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from anita import demo
from anita.dpo import cli as dpo_cli
from anita.errors import AnitaError
from anita.eval import cli as eval_cli
from anita.lora import cli as lora_cli
from anita.model import cli as model_cli
from anita.train import cli as train_cli

COMMANDS = [model_cli, eval_cli, lora_cli, train_cli, dpo_cli, demo]  # generate, convert-gguf, eval, merge, sft, dpo, demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anita", description="The LLaMAntino-3-ANITA recipe, readable.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except AnitaError as e:
        print(f"anita: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"anita: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anita: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
