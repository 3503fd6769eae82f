"""A rank process: its plan read (or built from overrides), the group joined, the run directory settled, the run
(worker/lifecycle) and the exit code."""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
from types import ModuleType

from launcher.environment import quiet_libraries
from launcher.errors import (
    CHECKPOINTED_MARK,
    NODE_SIDE,
    REQUEUE_EXIT_CODE,
    USAGE_EXIT_CODE,
    ConfigError,
    Preempted,
    TrainingStopped,
)
from launcher.hangs import logs_folder
from launcher.job import Job, job_from_environ, launch_env
from launcher.plan import Plan, build_plan, check_job, read_plan, restarted
from launcher.recipe import Recipe, parse_worker_argv
from launcher.worker import ranklog


def plan_for_rank(recipe: Recipe, argv: list[str], job: Job) -> tuple[Plan, str | None]:
    """This rank's plan and the file it came from: read from --plan (and checked against the job, never
    resolved again), or built from the overrides by `build_plan` (source None). Raises ConfigError."""
    args = parse_worker_argv(argv)
    if args.help:
        from launcher.views import print_settings

        print_settings(recipe.Config())
        sys.exit(0)
    if args.plan_path:
        if args.overrides:
            raise ConfigError(
                f"settings ({' '.join(args.overrides)}) given with --plan {args.plan_path}: a plan is already "
                f"resolved; drop the settings, or drop --plan to plan anew with them"
            )
        plan = read_plan(args.plan_path, recipe)
        problems = check_job(plan, job, args.plan_path)
        if problems:
            raise ConfigError(problems)
        return restarted(plan, job.restart), args.plan_path
    plan = build_plan(recipe, args.overrides, launch_env(job, deepspeed_runner=args.deepspeed_runner))
    return restarted(plan, job.restart), None


def run_recipe(module: ModuleType, argv: list[str] | None = None) -> None:
    """Entry point of every recipe's `main()`, under any launcher."""
    from launcher.worker.prefix import prefix_lines

    prefix_lines()  # under DeepSpeed's multi-node runner: [host:rank] before each line
    quiet_libraries()
    # `kill -QUIT PID` prints where a hung rank is (SIGUSR1 and SIGUSR2 ask a training rank to checkpoint and stop);
    # once the run directory is known, into output_dir/logs/stacks-rank-N.txt.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    argv = sys.argv[1:] if argv is None else argv
    job = job_from_environ()
    try:
        recipe = Recipe.of(module)
        plan, source = plan_for_rank(recipe, argv, job)
    except ConfigError as e:
        if job.is_main:
            print(e.render(), file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    _set_threads(plan)
    from launcher.worker import dist, lifecycle
    from launcher.worker.memory import limit_heap_retention

    if plan.config.host_memory == "lean":  # from the first allocation; auto decides once the model's size is known
        limit_heap_retention()

    ranks = dist.init(job)
    code = 0
    try:
        plan = _settle(plan, source, recipe, job, ranks)
        ranklog.start(logs_folder(plan.config.output_dir), ranks.rank, ranks.world_size)
        lifecycle.run(recipe, plan, ranks, job)
    except ConfigError as e:  # found only once the model exists (e.g. target modules it lacks): same on every rank
        if ranks.is_main:
            print(e.render(), file=sys.stderr)
        code = USAGE_EXIT_CODE
    except Preempted as e:  # agreed by every rank at the same step, its checkpoint written
        if ranks.is_main:
            print(e.render(), file=sys.stderr, flush=True)
        code = e.exit_code
    except TrainingStopped as e:  # decided on every rank alike (all-reduced loss, global gradient norm)
        if ranks.is_main:
            print(e.render(), file=sys.stderr)
        code = e.exit_code
    finally:
        # Free the engine (kept alive by reference cycles) while its process groups still exist.
        gc.collect()
        dist.shutdown()
    _exit(code, ranks.world_size)


def _settle(plan: Plan, source: str | None, recipe: Recipe, job: Job, ranks) -> Plan:
    """The plan every rank runs, its run directory claimed once (launcher.rundir). Ranks of `launcher run` find
    it claimed by their launcher. Under the direct forms (python, torchrun, deepspeed) every rank built a plan:
    rank 0 claims the run directory and writes its plan there, and every rank takes rank 0's plan (its run
    directory, say) and checks it against its own job. A plan given with --plan by hand is claimed by rank 0."""
    from launcher.rundir import claim, claim_rerun, claimed_by_launcher
    from launcher.worker import dist

    if source is not None and claimed_by_launcher(plan):
        return plan
    outcome: tuple[str | None, list[str]] = (None, [])
    if ranks.is_main:
        try:
            outcome = ((claim(plan) if source is None else claim_rerun(plan)).to_json(), [])
        except ConfigError as e:
            outcome = (None, e.problems)
    text, refused = dist.broadcast_object(outcome)
    if refused:
        raise ConfigError(refused)
    plan = Plan.from_json(text, recipe.Config)
    problems = [
        p for rank_problems in dist.gather_objects(check_job(plan, job, "rank 0's plan")) for p in rank_problems
    ]
    if problems:
        raise ConfigError(sorted(set(problems)))
    return plan


def _exit(code: int, world_size: int) -> None:
    """End a finished rank without running the interpreter's teardown when it shared a process group.

    Every file is written (atomically) and the group destroyed by now. Yet gloo/DeepSpeed C++ objects can
    still be freed during interpreter finalization, and now and then that aborts the process ("terminate
    called without an active exception", exit -6) after a run that succeeded; its launcher then kills the
    other ranks and reports failure. A rank that is done skips that teardown.
    """
    if code == REQUEUE_EXIT_CODE and os.environ.get(NODE_SIDE):
        print(CHECKPOINTED_MARK, flush=True)
    if world_size == 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    ranklog.stop()  # os._exit skips atexit: the rank's log is drained here
    os._exit(code)


def _set_threads(plan: Plan) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # the ranks of a node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.local_world_size))
