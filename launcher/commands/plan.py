"""`launcher plan`: memory per GPU and per node of each strategy, and the time per epoch, before launch."""

from __future__ import annotations

import argparse

from launcher.planning.view import run_plan_command

NAME, SETTINGS = "plan", True


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME,
        help="memory per GPU and per node of each strategy for a recipe's model and adapter, before launch "
        "(the model counted from its config.json, no weights read)",
    )
    parser.add_argument("recipe", help="path of the recipe module")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings, e.g. model=llama-3-8b adapter=qlora"
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="GPUs per node (default 8)")
    parser.add_argument("--gpu-mem", default="80GiB", metavar="SIZE", help="memory of one GPU (default 80GiB)")
    parser.add_argument("--cpu-mem", default="1TiB", metavar="SIZE", help="host memory of one node (default 1TiB)")
    parser.add_argument(
        "--seq-len", type=int, default=0, metavar="S", help="tokens per example (default: the recipe's data.max_length)"
    )
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=989.0,
        metavar="T",
        help="one GPU's peak TFLOP/s for the time per epoch (default 989: H100 SXM, dense bf16)",
    )
    parser.add_argument(
        "--row", metavar="NAME", help="a row to say the largest micro-batch and sequence of, and to --verify"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="train the recommended row (or --row) for 2 steps on 2 CPU processes, on a scaled-down model of the "
        "same family where the given one is too large here, and print measured against planned bytes",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    return run_plan_command(args)
