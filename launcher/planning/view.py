"""`launcher plan` on screen: reads the flags, builds the plan (planning.rows) and prints it as a table or JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from launcher.errors import ConfigError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'80GiB', '80GB', '1.5TiB', '1024' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError(f"{flag} {text}: give a size such as 80GiB, 40GB or 1TiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def human(n: int | float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def build(args: argparse.Namespace):
    from launcher.data.tokens import dataset_tokens
    from launcher.job import LaunchEnv
    from launcher.overrides import apply_overrides
    from launcher.plan import resolve
    from launcher.planning.counting import cached_count, planning_config
    from launcher.planning.rows import Machine, make_plan
    from launcher.recipe import Recipe

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: give at least 1")
    machine = Machine(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_bytes=parse_size(args.gpu_mem, "--gpu-mem"),
        cpu_bytes=parse_size(args.cpu_mem, "--cpu-mem"),
    )
    recipe = Recipe.load(args.recipe)
    gpus = machine.gpus_per_node
    env = LaunchEnv(world_size=machine.world, local_world_size=gpus, cuda=True, gpus=gpus, bf16_supported=True)
    cfg = resolve(apply_overrides(recipe.Config(), args.overrides), env)
    seq_len = args.seq_len or getattr(getattr(cfg, "data", None), "max_length", 0)
    if seq_len < 1:
        raise ConfigError("this recipe has no data.max_length: give the tokens per example with --seq-len S")
    if args.gpu_tflops <= 0:
        raise ConfigError(f"--gpu-tflops {args.gpu_tflops:g}: give one GPU's peak in TFLOP/s, e.g. 989 (H100, bf16)")
    config = planning_config(cfg.model)
    tokens = dataset_tokens(cfg)
    plan = make_plan(
        cfg, cached_count(config), config, machine, seq_len, named=args.row, tokens=tokens, peak_tflops=args.gpu_tflops
    )
    if args.verify:
        plan.verify = verify(plan, cfg, config)
    return plan


def verify(plan, cfg, config: dict) -> dict:
    """Probe the row named with --row, else the recommended one, else the first supported (launcher.planning.probe)."""
    from launcher.overrides import apply_overrides
    from launcher.planning import probe
    from launcher.planning.counting import cached_count, is_causal
    from launcher.planning.rows import Machine, plan_row

    if not is_causal(config):
        raise ConfigError(
            f"--verify probes causal language models; model={plan.model} is not one ({config.get('model_type')})"
        )
    name = plan.named.get("row") or plan.recommended or next(r.strategy for r in plan.rows if r.state is not None)
    row_cfg = apply_overrides(cfg, plan.row(name).overrides)
    setup = probe.setup(config, row_cfg, plan.seq_len, probe.available_memory())
    changes = "; ".join(setup.why) or "as planned"
    print(
        f"verifying {name} on {probe.WORLD} CPU processes for {probe.STEPS} steps: {changes}",
        file=sys.stderr,
        flush=True,
    )
    measured = probe.run(setup, row_cfg)
    counts = cached_count(setup.config)
    row = plan_row(
        name, setup.overrides, row_cfg, counts, setup.config, Machine(1, probe.WORLD), setup.seq_len, gpu=False
    )
    return {
        "row": name,
        "world": probe.WORLD,
        "device": "cpu",
        "scaled": setup.scaled,
        "changes": setup.why,
        "parameters": counts.total,
        "model": {
            k: setup.config.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
        },
        "micro_batch_size": setup.micro_batch,
        "seq_len": setup.seq_len,
        **probe.compare(row, measured),
    }


def run_plan_command(args: argparse.Namespace) -> int:
    plan = build(args)
    try:
        if args.json:
            print(json.dumps(plan.as_json(), indent=2), flush=True)
        else:
            print_plan(plan)
    except BrokenPipeError:  # `launcher plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_plan(plan) -> None:
    from rich.table import Table

    from launcher.console import make_console
    from launcher.planning.rows import SAFETY, fits

    m = plan.machine
    console = make_console()
    console.print(
        f"[bold]{plan.model}[/]: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable / 1e6:.1f}M trained "
        f"(adapter={plan.adapter}, optimizer={plan.optimizer}, precision={plan.precision}); micro-batch "
        f"{plan.micro_batch} x {plan.seq_len} tokens, activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}"
    )
    console.print(
        f"for {m.nodes} node(s) x {m.gpus_per_node} GPUs of {human(m.gpu_bytes)}, {human(m.cpu_bytes)} host memory "
        "per node (--nodes, --gpus-per-node, --gpu-mem, --cpu-mem)"
    )
    table = Table(title_justify="left")
    for col in ("strategy", "model state/GPU", "gathered", "activations", "GPU total", "CPU/node", "fits", "epoch"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for row in plan.rows:
        if row.state is None:
            table.add_row(row.strategy, "[dim]not supported[/]", "", "", "", "", "")
            continue
        mark = " (recommended)" if row.strategy == plan.recommended else ""
        ok = fits(row, m)
        table.add_row(
            f"{row.strategy}{mark}",
            human(row.state.on("gpu")),
            human(row.gathered),
            human(row.activations),
            human(row.gpu_bytes),
            human(row.state.on("cpu") * m.gpus_per_node),
            "[green]yes[/]" if ok else "[red]no[/]",
            duration(row.epoch_seconds),
            style="bold" if mark else None,
        )
    console.print(table)
    if plan.recommended is None:
        tries = [] if plan.adapter == "qlora" else ["adapter=qlora"]
        tries += [] if plan.activation_checkpointing else ["activation_checkpointing=true"]
        tries += ["a smaller train.micro_batch_size or --seq-len", "more GPUs (--nodes, --gpus-per-node)"]
        console.print(f"[red]nothing fits[/] within {SAFETY:.0%} of a GPU; try {', '.join(tries)}")
    else:
        rec = next(r for r in plan.rows if r.strategy == plan.recommended)
        console.print(
            f"recommended: [bold]{rec.strategy}[/] ({' '.join(rec.overrides)}), the cheapest that fits within "
            f"{SAFETY:.0%} of a GPU; at {plan.seq_len} tokens it fits micro-batches up to "
            f"{plan.limits['max_micro_batch_size']}, and at micro-batch {plan.micro_batch} sequences up to "
            f"{plan.limits['max_seq_len']} tokens"
        )
    for row in plan.rows:
        if row.refused:
            console.print(f"[dim]{row.strategy}: {row.refused}[/]")
    print_time(console, plan)
    if plan.verify:
        print_verify(console, plan.verify)
    console.print(
        "[dim]GPU total = model state + gathered block + activations + step temporaries + allowance "
        "(1 GiB + 10%); docs/planning.md says how each term is computed and checked[/]"
    )


def print_verify(console, v: dict) -> None:
    from rich.table import Table

    where = "a scaled-down model of the family" if v["scaled"] else "the model"
    console.print(
        f"[bold]verified[/] {v['row']} on {v['world']} CPU processes, {where} ({v['parameters'] / 1e6:.1f}M "
        f"parameters), micro-batch {v['micro_batch_size']} x {v['seq_len']} tokens, fp32; "
        "its own plan beside what a rank held:"
    )
    table = Table(title_justify="left")
    for col in ("term", "planned", "measured", "measured/planned"):
        table.add_column(col, justify="left" if col == "term" else "right")

    def shown(r):
        return f"{r:.3f}" if r is not None else "-"

    for term, t in v["terms"].items():
        table.add_row(term, human(t["planned"]), human(t["measured"]), shown(t["ratio"]))
    state = v["model_state"]
    table.add_row("model state", human(state["planned"]), human(state["measured"]), shown(v["ratio"]), style="bold")
    rss = v["peak_rss"]
    table.add_row("peak RSS above idle", human(rss["planned"]), human(rss["measured"]), shown(rss["ratio"]))
    console.print(table)
    console.print(
        f"[dim]loading {v['load_seconds']:.1f} s, a step {v['step_seconds']:.1f} s; losses "
        + ", ".join(f"{x:.3f}" for x in v["losses"])
        + "[/]"
    )


def print_time(console, plan) -> None:
    from launcher.planning.timing import UTILISATION

    f, t = plan.flops, plan.tokens
    how = "6N" if f["matmul"] == 6 * f["matmul_params"] else "about 4N, the base frozen,"
    recompute = f", {f['recompute'] / 1e9:.2f} recomputed (activation checkpointing)" if f["recompute"] else ""
    console.print(
        f"epoch: {f['model'] / 1e9:.2f} GFLOP per token ({how} + attention, N = {f['matmul_params'] / 1e9:.2f}B "
        f"matmul parameters{recompute}); "
        + (
            f"{t['tokens']:,} tokens in {t['examples']:,} examples, {t['note']}"
            if t.get("tokens")
            else f"tokens unknown: {t.get('note', 'no data')}"
        )
    )
    shares = ", ".join(f"{k} {v:.0%}" for k, v in UTILISATION.items())
    console.print(
        f"[dim]times assume {plan.peak_tflops:g} TFLOP/s per GPU (--gpu-tflops) at a stated utilisation per row "
        f"({shares}; x0.7 for a 4-bit or 8-bit base), not a measurement[/]"
    )
