"""User-facing errors: each names the setting, the value and the fix, and exits with code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class TrainingStopped(Exception):
    """Training cannot go on (e.g. the loss became nan); the run ends with exit code 1 and saves nothing."""

    exit_code = 1

    def render(self) -> str:
        return f"error: {self}"


class ConfigError(Exception):
    """One or more problems with what the user asked for. All problems are reported together."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"error: {self.problems[0]}"
        lines = [f"error: {len(self.problems)} problems with the configuration:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
