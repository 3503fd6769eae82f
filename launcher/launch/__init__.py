"""Pure builders of commands (commands.py) and the one module that spawns processes (execute.py)."""
