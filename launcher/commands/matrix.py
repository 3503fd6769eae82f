"""`launcher matrix`: which strategy x adapter x optimizer combinations are supported, and why not."""

from __future__ import annotations

import argparse
import sys

from launcher.compat_view import print_matrix, render_markdown

NAME, SETTINGS = "matrix", False


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME, help="show which strategy x adapter x optimizer combinations are supported, and why not"
    )
    parser.add_argument("--markdown", action="store_true", help="print the docs page (docs/matrix.md) instead")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(render_markdown())
    else:
        print_matrix()
    return 0
