"""`launcher export`: a checkpoint as a Hugging Face model folder."""

from __future__ import annotations

import argparse

from launcher.environment import quiet_libraries

NAME, SETTINGS = "export", False


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME, help="write a checkpoint as a Hugging Face model folder (the adapter, or merged with --merge)"
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder: OUTPUT_DIR/checkpoints/step-N")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder (must not exist yet)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base weights (a quantized base is dequantized, the model written in bf16)",
    )
    parser.add_argument(
        "--recipe",
        default="",
        metavar="PATH",
        help="the recipe that rebuilds the model (default: the checkpoint's own copy of the recipe that wrote it)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from launcher.worker.export_checkpoint import export  # torch, transformers, peft: not for --help

    print(f"launcher: exporting {args.checkpoint}{' (merged)' if args.merge else ''}", flush=True)
    done = export(args.checkpoint, args.out, merge=args.merge, recipe_path=args.recipe)
    for note in done.notes:
        print(f"note: {note}")
    what = {"adapter": "the adapter (peft)", "merged": "the merged model", "model": "the model"}[done.kind]
    print(f"wrote {what} to {done.folder}")
    if done.max_logit_difference is not None:
        print(
            f"checked: loaded back with transformers, its logits on {done.examples} examples are within "
            f"{done.max_logit_difference:.2e} of the trained model's"
        )
    return 0
