"""Run by torchrun once per test session: recipe runs handed to it one after another, each in this one process group
(the imports and the group's start paid once, not per run), each as a direct launch runs it: the plan built from the
recipe and its settings, the run directory claimed by rank 0 (worker.main's own path), then worker.lifecycle.run.

usage: torchrun --nproc_per_node N session_worker.py QUEUE
A run is QUEUE/K.json {"recipe": PATH, "overrides": [...], "cwd": DIR, "env": {NAME: VALUE}}, K = 1, 2, ...; every
rank waits for the next file itself (a collective left waiting between tests would time out), runs it with `env`
added to its environment and its output in QUEUE/K.rankR.out and .err; rank 0 writes QUEUE/K.started when it takes
the run (a worker that died before that is started again and given the run anew) and the run's outcome to
QUEUE/K.done.json {"code": the exit code a launch would give, "error": its message or traceback}. {"recipe": ""} ends
the worker. A run that fails other than by a usage error, a stopped training or a preemption leaves the ranks out of
step: the worker then writes its outcome and exits, and the next run starts a new worker.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from launcher.environment import quiet_libraries
from launcher.errors import USAGE_EXIT_CODE, ConfigError, Preempted, TrainingStopped
from launcher.files import write_atomic
from launcher.job import job_from_environ, launch_env
from launcher.plan import build_plan
from launcher.recipe import Recipe
from launcher.rundir import release_claims
from launcher.worker import dist, lifecycle
from launcher.worker import main as rank_main
from tests.helpers import imports_frozen

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def next_request(queue: str, k: int) -> dict:
    path = os.path.join(queue, f"{k}.json")
    while not os.path.exists(path):
        time.sleep(0.05)
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def redirected(request: dict, prefix: str):
    """The run's environment and output files (sys.stdout and sys.stderr: what the run log and refusals write)."""
    before = dict(os.environ)
    os.environ.update(request.get("env", {}))
    os.chdir(request["cwd"])
    with open(prefix + ".out", "w") as out, open(prefix + ".err", "w") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                yield
            finally:
                os.environ.clear()
                os.environ.update(before)


def run_one(request: dict, job, ranks) -> tuple[int, str, bool]:
    """(exit code, message, whether the ranks are still in step) of one run."""
    try:
        recipe = Recipe.load(request["recipe"])
        plan = build_plan(recipe, request["overrides"], launch_env(job))
        plan = rank_main._settle(plan, None, recipe, job, ranks)
        lifecycle.run(recipe, plan, ranks, job)
        return 0, "", True
    except ConfigError as e:  # found on every rank alike, as in a launch
        return USAGE_EXIT_CODE, e.render(), True
    except (Preempted, TrainingStopped) as e:
        return e.exit_code, e.render(), True
    except Exception:
        return 1, traceback.format_exc(), False
    finally:
        release_claims()
        gc.collect()


def main() -> None:
    queue = os.path.abspath(sys.argv[1])
    quiet_libraries()
    imports_frozen()
    job = job_from_environ()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.local_world_size))  # the ranks share the cores
    ranks = dist.init(job)
    k = 0
    while True:
        k += 1
        request = next_request(queue, k)
        if not request["recipe"]:
            break
        if ranks.is_main:
            write_atomic(os.path.join(queue, f"{k}.started"), "")
        with redirected(request, os.path.join(queue, f"{k}.rank{ranks.rank}")):
            code, message, in_step = run_one(request, job, ranks)
        if ranks.is_main:
            write_atomic(os.path.join(queue, f"{k}.done.json"), json.dumps({"code": code, "error": message}))
        if not in_step:
            os._exit(1)
    dist.shutdown()
    os._exit(0)


# ------------------------------------------------------------------------------------------ the tests' side


class SessionWorker:
    """This program on `nproc` ranks (conftest's ranks1 and ranks2), started at its first run and ended with the
    session: short recipe runs whose tests read only what the run wrote go through it, in its process group, instead
    of each paying a launch (the imports of every rank, the group's start: most of a tiny run's time)."""

    def __init__(self, nproc: int, folder: Path):
        self.nproc, self.folder = nproc, folder
        self.proc: subprocess.Popen | None = None
        self.queue, self.k, self.starts = folder, 0, 0

    def run(self, recipe: str, overrides: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600):
        """Run `recipe` with `overrides` as `launcher run RECIPE --nproc N ...` would, in `cwd` with `env` added;
        returns a CompletedProcess: its exit code, rank 0's output and the refusal or traceback in stderr."""
        request = {"recipe": str(recipe), "overrides": [str(o) for o in overrides], "cwd": str(cwd), "env": env or {}}
        deadline = time.monotonic() + timeout
        for _ in range(2):  # a worker that ended between runs (it was not given this one yet) is started again
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.k += 1
            (self.queue / f"{self.k}.json").write_text(json.dumps(request))
            done, started = self.queue / f"{self.k}.done.json", self.queue / f"{self.k}.started"
            while not done.exists() and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if done.exists() or started.exists() or self.proc.poll() is None:
                break
        if not done.exists():
            self.close()
            log = (self.queue / "worker.log").read_text()[-6000:]
            raise AssertionError(f"the session worker ended or stalled on {request}:\n{log}")
        outcome = json.loads(done.read_text())
        out, err = (self.queue / f"{self.k}.rank0.{name}" for name in ("out", "err"))
        argv = ["launcher", "run", recipe, "--nproc", str(self.nproc), *overrides]
        return subprocess.CompletedProcess(argv, outcome["code"], out.read_text(), err.read_text() + outcome["error"])

    def _start(self) -> None:
        self.starts += 1
        self.queue, self.k = self.folder / f"queue-{self.starts}", 0
        self.queue.mkdir()
        argv = ["torchrun", "--standalone", "--nproc_per_node", str(self.nproc)]
        argv += [os.path.abspath(__file__), str(self.queue)]
        env = {**os.environ, "PYTHONPATH": ROOT}
        with (self.queue / "worker.log").open("w") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.k += 1
        (self.queue / f"{self.k}.json").write_text(json.dumps({"recipe": ""}))
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


if __name__ == "__main__":
    main()
