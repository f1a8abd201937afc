"""The `anita` command line: one sub-command per stage of the recipe.

Each sub-command lives beside the code it drives, in a module with `register(subparsers)` that
adds its parser and sets `func`. Bad input (`AnitaError`) becomes one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anita.errors import AnitaError

COMMAND_MODULES = [
    "anita.model.cli",  # generate, convert-gguf
    "anita.eval.cli",  # eval
    "anita.lora.cli",  # merge
    "anita.train.cli",  # sft
    "anita.dpo.cli",  # dpo
    "anita.demo",  # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anita", description="The LLaMAntino-3-ANITA recipe, readable.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
