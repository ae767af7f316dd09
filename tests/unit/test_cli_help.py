"""`--help` of every subcommand: a description, the defaults, and the exit codes (a new subcommand is covered too)."""

from __future__ import annotations

import argparse

import pytest

from agent import cli


def subparsers(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command by its words ("status", "hardware-identity init"): a command with actions of its own is
    the actions, each with its options."""
    action = next(a for a in (parser or cli.build_parser())._actions if isinstance(a, argparse._SubParsersAction))
    found: dict[str, argparse.ArgumentParser] = {}
    for name, sub in action.choices.items():
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            found.update(subparsers(sub, f"{prefix}{name} "))
        else:
            found[prefix + name] = sub
    return found


def test_the_top_level_help_names_the_common_exit_codes() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    assert "exit status" in text.lower() and "78 configuration error" in text and "COMMAND --help" in text


@pytest.mark.parametrize("name", sorted(subparsers()))
def test_each_subcommand_has_a_description_exit_codes_and_its_defaults(name: str) -> None:
    parser = subparsers()[name]
    text = " ".join(parser.format_help().split())
    assert parser.description and len(parser.description) > 40, name
    assert parser.epilog and "exit status:" in parser.epilog, name
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or action.required:
            continue
        shown = str(int(default)) if isinstance(default, float) and default.is_integer() else str(default)
        assert f"default {shown}" in text or f"default: {shown}" in text or f"(default: {shown})" in text, (
            name, action.dest, default)

