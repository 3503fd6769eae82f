"""The subcommands of `launcher`, one module each: its parser (`add_parser`) next to what it does (`run`).
`SETTINGS` says whether it takes key=value settings (a recipe's), which may come before or after its flags."""

from launcher.commands import check, export, matrix, new, plan, recipes, report, run, sbatch

COMMANDS = (run, check, sbatch, plan, export, matrix, report, recipes, new)
"""In the order `launcher --help` lists them."""
