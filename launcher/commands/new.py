"""`launcher new`: a copy of a recipe, ready to edit."""

from __future__ import annotations

import argparse

from launcher.authoring import new_recipe

NAME, SETTINGS = "new", False


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="copy a recipe into recipes/NAME.py, ready to edit")
    parser.add_argument("name", metavar="NAME", help="the new recipe's name, e.g. my_cls")
    parser.add_argument("--from", dest="source", default="lora_cls", help="recipe to copy (default: lora_cls)")
    parser.add_argument("--dir", default="recipes", help="folder holding the recipes (default: ./recipes)")
    return parser


def run(args: argparse.Namespace) -> int:
    path = new_recipe(args.name, args.source, args.dir)
    print(f"wrote {path} (a copy of {args.source}); edit it, then: launcher run {path} --dry-run")
    return 0
