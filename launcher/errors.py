"""User-facing errors: each names the setting, the value and the fix, and exits with code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2
REQUEUE_EXIT_CODE = 75
CHECKPOINTED_MARK = "@launcher-rank-checkpointed"
"""The last line of each rank that saved a checkpoint and stopped (exit 75) under the node side
(launcher.launch.node), which reads it: torchrun itself exits 1 after a preemption signal, whatever its ranks did."""
NODE_SIDE = "LAUNCHER_NODE_SIDE"
"""Set by the node side for its torchrun's ranks."""
"""A run asked to stop (SIGTERM, SIGUSR1 or SIGUSR2: a preemption) that saved a checkpoint first: rerun it with
resume=auto. 75 is EX_TEMPFAIL, "try again later"; batch scripts requeue on it."""
HUNG_EXIT_CODE = 124
"""A rank that made no progress for watchdog.timeout seconds (worker.watchdog); 124 as timeout(1) uses."""
DIVERGED_EXIT_CODE = 3
"""Training stopped on a nan/inf loss or gradient norm; not restarted (--max-restarts): it would diverge again at
the same step."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. the loss became nan); the run ends with exit code 3 and saves nothing."""

    exit_code = DIVERGED_EXIT_CODE

    def render(self) -> str:
        return f"error: {self}"


class Preempted(Exception):
    """Every rank finished the same step, saved a checkpoint and stopped, as a stop signal asked."""

    exit_code = REQUEUE_EXIT_CODE

    def render(self) -> str:
        return f"stopped: {self}"


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
