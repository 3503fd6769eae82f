"""`launcher recipes`: the recipes of a folder, one line each."""

from __future__ import annotations

import argparse

from rich.table import Table

from launcher.authoring import describe_recipes
from launcher.console import make_console

NAME, SETTINGS = "recipes", False


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="list the recipes with a one-line description each")
    parser.add_argument("--dir", default="recipes", help="folder holding the recipes (default: ./recipes)")
    return parser


def run(args: argparse.Namespace) -> int:
    table = Table(title=f"recipes in {args.dir}", title_justify="left")
    table.add_column("recipe", style="bold cyan", no_wrap=True)
    table.add_column("description")
    for name, description in describe_recipes(args.dir):
        table.add_row(name, description)
    make_console().print(table)
    return 0
