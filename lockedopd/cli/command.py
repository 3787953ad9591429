"""What the subcommands share: how one is registered, and the arguments several of them take."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_command", "add_config_arguments", "add_report_arguments"]


def add_command(
    subparsers, name: str, help: str, description: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The subcommand ``name`` (its one-line ``help`` in ``lockedopd --help``, ``description`` in its own), whose
    parsed arguments run ``handler``; returns its parser for the arguments."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(handler=handler)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML config (see recipes/configs/)"):
    """``CONFIG [key=value ...]``: a YAML config and dotted overrides of its settings."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, e.g. lock.rank=8)")


def add_report_arguments(parser: argparse.ArgumentParser, json_help: str, plot_help: str, include_help: str) -> None:
    """``--json OUT``, ``--plot OUT.png``, ``--include REGEX`` and ``--no-progress`` of the diagnostics commands."""
    parser.add_argument("--json", dest="json_out", metavar="OUT", default=None, help=json_help)
    parser.add_argument("--plot", metavar="OUT.png", default=None, help=plot_help)
    parser.add_argument("--include", metavar="REGEX", default=None, help=include_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
