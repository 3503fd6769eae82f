"""What the command line prints about settings: a recipe's settings table (--help) and a dry run."""

from __future__ import annotations

import json


def print_dry_run(plan_json: str, plan_path: str, lines: list[str], nproc: int, sections: dict[str, dict]) -> None:
    """The plan, each rank's command and whatever the strategy will be configured with (`sections`: title ->
    JSON-ready dict, e.g. DeepSpeed's config)."""
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console(highlight=False)
    console.print("[bold]resolved plan[/]")
    console.print(Syntax(plan_json, "json", theme="ansi_dark", background_color="default"))
    console.print(f"[bold]commands[/] ({nproc} process(es); each reads the plan written to {plan_path})")
    for line in lines:
        console.print(line, soft_wrap=True)
    for title, content in sections.items():
        console.print(f"[bold]{title}[/]")
        console.print(Syntax(json.dumps(content, indent=2), "json", theme="ansi_dark", background_color="default"))
    console.print("[dim]dry run: nothing was started or written[/]")


def print_settings(cfg) -> None:
    """Every setting of a recipe's config with its default and docstring (a recipe's --help)."""
    from rich.console import Console
    from rich.table import Table

    from launcher.overrides import describe

    table = Table(title=f"settings of {type(cfg).recipe} (override as key=value)", title_justify="left")
    table.add_column("setting", style="bold cyan", no_wrap=True)
    table.add_column("default")
    table.add_column("meaning")
    for path, value, doc in describe(cfg):
        table.add_row(path, value, doc)
    Console().print(table)
