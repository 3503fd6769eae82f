"""`launcher report`: report.html and report.png of one or more run directories."""

from __future__ import annotations

import argparse

from launcher.report import write_report

NAME, SETTINGS = "report", False


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME,
        help="write report.html and report.png for one or more run directories (loss, eval, lr, throughput, memory "
        "over steps, overlaid; the settings they differ in)",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (several: overlaid)")
    parser.add_argument("--out", metavar="DIR", help="where to write them (default: the run directory, or ./report)")
    return parser


def run(args: argparse.Namespace) -> int:
    out = args.out or (args.runs[0] if len(args.runs) == 1 else "report")
    png, page = write_report(args.runs, out)
    print(f"report: {page}\nplot:   {png}")
    return 0
