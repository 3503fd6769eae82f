"""`launcher` command line: the parser built from the subcommands (launcher/commands/, one module each) and the
exit codes. Heavy libraries are imported only by the commands that need them, so `launcher --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

from launcher.commands import COMMANDS
from launcher.commands.run import EPILOG
from launcher.errors import USAGE_EXIT_CODE, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher",
        description="Fine-tune transformer models from plain Python recipes, on one or many processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `launcher matrix | head`: the reader has what it wanted; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_EXIT_CODE
    command = next(c for c in COMMANDS if c.NAME == args.command)
    if not command.SETTINGS and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if command.SETTINGS:
        # Settings may come before or after the flags: `run R a=1 --nproc 2 b=2`.
        flags = [a for a in extra if a.startswith("-") or "=" not in a]
        if flags:
            parser.error(f"unrecognized arguments: {' '.join(flags)} (settings are key=value)")
        args.overrides = list(args.overrides) + extra
    try:
        return command.run(args)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return USAGE_EXIT_CODE
