"""What the command line prints about settings: a recipe's settings table (--help) and a dry run."""

from __future__ import annotations

import json


def print_dry_run(
    plan_json: str, plan_path: str, lines: list[str], nproc: int, sections: dict[str, dict], deletes: str = ""
) -> None:
    """The plan, each rank's command, whatever the strategy will be configured with (`sections`: title ->
    JSON-ready dict, e.g. DeepSpeed's config) and what the run would delete (`deletes`, a sentence, or empty)."""
    from rich.syntax import Syntax

    from launcher.console import make_console

    console = make_console()
    console.print("[bold]resolved plan[/]")
    console.print(Syntax(plan_json, "json", theme="ansi_dark", background_color="default"))
    console.print(f"[bold]commands[/] ({nproc} process(es); each reads the plan written to {plan_path})")
    for line in lines:
        console.print(line, soft_wrap=True)
    for title, content in sections.items():
        console.print(f"[bold]{title}[/]")
        console.print(Syntax(json.dumps(content, indent=2), "json", theme="ansi_dark", background_color="default"))
    if deletes:
        console.print(f"[bold]{deletes}[/]", soft_wrap=True)
    console.print("[dim]dry run: nothing was started or written[/]")


def print_settings(cfg) -> None:
    """Every setting of a recipe's config with its default and docstring (a recipe's --help)."""
    from rich import box
    from rich.table import Table

    from launcher.console import make_console
    from launcher.overrides import describe

    # No frame: off a terminal each setting is one line that ends with its meaning (a frame would pad it out).
    table = Table(
        title=f"settings of {type(cfg).recipe} (override as key=value)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    table.add_column("setting", style="bold cyan", no_wrap=True)
    table.add_column("default")
    table.add_column("meaning")
    for path, value, doc in describe(cfg):
        table.add_row(path, value, doc)
    make_console().print(table)


def print_check(rows, allreduce, hosts_first: str) -> None:
    """`launcher check`: a line per host (versions, GPUs, free space, write access, what is wrong), then the
    all-reduce across the hosts."""
    from rich.table import Table

    from launcher.console import make_console

    first = next((r.report for r in rows if r.report is not None), {"versions": {"python": ""}})
    packages = [name for name in first["versions"] if name != "python"]  # the probe's, in its order
    table = Table(title=f"hosts (versions compared with the first, {hosts_first})", title_justify="left")
    for column in ("host", "slots", "python", *packages, "GPUs", "free GiB", "writes", "status"):
        table.add_column(column, no_wrap=column != "status")
    for row in rows:
        r = row.report
        if r is None:
            table.add_row(row.host, str(row.slots), *["-"] * (len(packages) + 4), "[red]" + "; ".join(row.problems))
            continue
        versions = [r["versions"].get(n, "?") for n in ("python", *packages)]
        status = "[red]" + "; ".join(p.split(": ", 1)[1] for p in row.problems) if row.problems else "[green]ok"
        free = f"{r['free_bytes'] / 2**30:.1f}"
        table.add_row(
            row.host, str(row.slots), *versions, str(r["gpus"]), free, "yes" if r["writable"] else "no", status
        )
    console = make_console()
    console.print(table)
    if isinstance(allreduce, dict):
        right = "" if allreduce["right"] else " [red]but the sum was wrong[/]"
        console.print(
            f"all-reduce across {allreduce['world']} hosts ({allreduce['backend']}): {allreduce['mb']} MB in "
            f"{allreduce['seconds'] * 1e3:.1f} ms, bus bandwidth {allreduce['bus_gb_s']:.2f} GB/s{right}"
        )
    elif allreduce is not None:
        console.print(f"[red]{allreduce}[/]")
    else:
        console.print("all-reduce: not tried (a host did not answer)")
