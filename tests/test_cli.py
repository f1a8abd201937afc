"""anita/cli.py: every command's --help reads cleanly."""

import argparse

import pytest

from anita.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_and_no_none_default_noise(name):
    """Every option says what it is; no '(default: None)', and no default printed twice."""
    parser = subcommands()[name]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            assert "default: None" not in action.help, f"{name} {action.option_strings[0]}"
            assert action.help.count("(default") <= 1, f"{name} {action.option_strings[0]}: {action.help}"
    assert subcommands().keys() >= {"generate", "convert-gguf", "eval", "merge", "sft", "dpo", "demo"}
