"""A rank's life: read the plan (or build it from overrides), join the group, train, evaluate, save."""

from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from types import ModuleType

from launcher.config import Full, RunConfig, choice_name
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
from launcher.files import write_atomic
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
    from launcher.worker import dist
    from launcher.worker.memory import limit_heap_retention

    if plan.config.host_memory == "lean":  # from the first allocation; auto decides once the model's size is known
        limit_heap_retention()

    ranks = dist.init(job)
    code = 0
    try:
        plan = _settle(plan, source, recipe, job, ranks)
        ranklog.start(logs_folder(plan.config.output_dir), ranks.rank, ranks.world_size)
        run(recipe, plan, ranks, job)
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


def run(recipe: Recipe, plan: Plan, ranks, job: Job | None = None) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from launcher import checkpoints
    from launcher.data import take_notes
    from launcher.overrides import to_dict
    from launcher.selection import Selection
    from launcher.worker import adalora, adversarial, dist, holdings, loop, memory
    from launcher.worker.adapters import apply_adapter, count_parameters
    from launcher.worker.compiled import compile_blocks
    from launcher.worker.export import save_model
    from launcher.worker.optim import build_optimizer, build_scheduler
    from launcher.worker.preempt import stop_after_training, stop_requests
    from launcher.worker.runlog import RunLog
    from launcher.worker.strategies import EngineInputs, build_engine
    from launcher.worker.trackers import open_trackers, tracker_places
    from launcher.worker.watchdog import Watchdog, beating_forwards, stacks_on_sigquit
    from launcher.worker.weights import has_meta, weights_for

    transformers.utils.logging.disable_progress_bar()
    t_start = time.time()
    cfg = plan.config
    job = job or Job()
    stacks_on_sigquit(logs_folder(cfg.output_dir), ranks.rank)

    def say(what: str) -> None:  # rank 0 tells what the seconds before the first step are spent on
        if ranks.is_main:
            print(f"{recipe.name}: {what} ({time.time() - t_start:.0f}s)", flush=True)

    from launcher.worker import checkpoint

    chosen = checkpoint.choose(cfg, ranks)  # checked before anything is built: a bad checkpoint fails in seconds
    say("reading and tokenizing the data")
    if recipe.build_tokenizer is not None:  # e.g. one trained on the data, for a model built from a config
        tokenizer = recipe.build_tokenizer(cfg)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    task = recipe.build_task(cfg, tokenizer)
    notes = [*plan.notes, *take_notes(), *task.notes]  # what the data layer and the recipe want the user to know
    loader = loop.train_loader(task, cfg, ranks)
    total = loop.total_steps(loader, cfg)

    say(f"building the model ({cfg.model})")
    t_model = time.time()
    before_model = dist.gather_objects(round(memory.rss_mib()[0], 1))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and under every strategy
    base = recipe.build_model(cfg, task)
    # A model built on the meta device (launcher.empty_weights) is loaded by its strategy, each rank its part.
    weights = weights_for(base, cfg.model_path, seed=cfg.seed) if has_meta(base) else None
    # Decided before the weights are loaded (a meta-built model is filled in by apply_adapter and the strategy).
    lean = memory.lean(cfg.host_memory, sum(p.numel() for p in base.parameters()))
    if lean:
        memory.limit_heap_retention()
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    block_types = tuple({type(m) for m in base.modules() if type(m).__name__ in block_names})
    model = apply_adapter(
        base,
        cfg,
        task_type=task.peft_task_type,
        heads=task.heads,
        device=ranks.device,
        weights=weights,
        total_steps=total,
    )
    trainable, params = count_parameters(model)

    def make_optimizer(module, plain_groups=None):
        opt = build_optimizer(module, cfg.train, cfg.optimizer, plain_groups)
        return opt, build_scheduler(opt, cfg.train, total)

    say(f"applying {choice_name(cfg.adapter)} and {choice_name(cfg.strategy)} on {ranks.world_size} process(es)")
    compiled = compile_blocks(model, block_types) if cfg.compile else 0
    engine = build_engine(
        EngineInputs(
            model=model,
            cfg=cfg,
            device=ranks.device,
            make_optimizer=make_optimizer,
            block_types=block_types,
            local_world_size=plan.local_world_size,
            weights=weights if has_meta(model) else None,
        )
    )
    if lean and ranks.device.type == "cpu":
        memory.trim_between_blocks(engine.module, block_types)
    adversary = adversarial.attach(engine.module, cfg.train)
    if adversary is not None:  # each micro-batch's loss is the clean one plus the one at perturbed embeddings
        engine.micro_loss = adversary.loss
    # What this rank holds of its model state, measured on the first steps (the second has the optimizer's states):
    # summary.json says it beside the peak RSS, and `launcher plan` is checked against it.
    held = holdings.Recorder(engine.held_tensors, steps=2)
    engine.between_backward_and_step = held
    budget = adalora.attach(engine)  # AdaLoRA: the gradients its scores need are kept before the step takes them
    if budget is not None:
        engine.between_backward_and_step = lambda: (held(), budget.keep_gradients())
    if weights is not None:
        notes += weights.notes

    def restore_budget(state: dict) -> None:
        if budget is not None:
            budget.restore(state.get("adalora"))

    start = None
    if chosen is not None:
        say(f"loading the checkpoint {chosen.path}")
        start = checkpoint.load(engine, chosen, ranks, grad_accum=cfg.train.grad_accum, restore=restore_budget)
        notes.append(chosen.note)
    elif cfg.resume == "auto":
        notes.append(f"resume=auto: no checkpoint in {os.path.join(cfg.output_dir, 'checkpoints')} yet: a fresh start")
    load_seconds = time.time() - t_model
    # Peak resident memory once the model is loaded and wrapped, before training adds activations and optimizer state.
    loaded_peak = dist.gather_objects(round(memory.rss_mib()[1], 1))
    log = RunLog(
        cfg.output_dir,
        active=ranks.is_main,
        total_steps=total,
        log_every=cfg.train.log_every,
        resumed_at=start.step if start is not None else None,
        epochs=None if cfg.train.max_steps else cfg.train.epochs,
        world_size=ranks.world_size,
        **(_gpu_view(cfg, task, ranks) if ranks.device.type == "cuda" and ranks.is_main else {}),
        trackers=open_trackers(cfg.tracking, recipe.name, cfg.output_dir, to_dict(cfg)) if ranks.is_main else None,
    )
    if job.restart:  # the run log says the job was started again, from which step and why
        log.event(
            "restart",
            start.step if start is not None else 0,
            restart=job.restart,
            after=job.restart_reason or "a failure (the job was started again by its launcher, e.g. torchrun)",
        )
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum * ranks.world_size
    log.table(
        f"{type(cfg).recipe}: starting",
        [
            ("model", f"{cfg.model} ({params / 1e6:.1f}M parameters)"),
            ("adapter", f"{choice_name(cfg.adapter)}: {trainable:,} trainable ({100 * trainable / params:.2f}%)"),
            (
                "strategy",
                f"{choice_name(cfg.strategy)} on {ranks.world_size} process(es), {ranks.device.type}, {cfg.precision}",
            ),
            (
                "batch",
                f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} accum x {ranks.world_size} ranks "
                f"= {effective} per step",
            ),
            ("data", f"{len(task.train):,} train / {len(task.eval) if task.eval is not None else 0:,} eval examples"),
            (
                "steps",
                f"{total:,} at lr {cfg.train.lr:g} ({cfg.train.schedule})"
                + (f", from step {start.step}" if start is not None else ""),
            ),
            ("output", cfg.output_dir),
            *[("note", note) for note in notes],
        ],
    )

    # The metric early stopping and keep_best follow; a resumed run goes on from its checkpoint's count.
    selection = Selection.of(cfg)
    keep_best = cfg.checkpoint.keep_best
    evals = loop.Evaluations(selection=selection, keep_best=keep_best)
    if chosen is not None and selection is not None and selection.restore(chosen.manifest.get("selection")):
        best = os.path.join(os.path.dirname(chosen.path), checkpoints.folder_name(selection.best_step))
        evals.best_checkpoint = best if keep_best and os.path.isdir(best) else None

    def save_checkpoint(position: checkpoint.Position) -> str:
        path = checkpoint.save(
            engine,
            cfg,
            position,
            ranks,
            recipe=recipe.path,
            selection=selection.state() if selection is not None else None,
            protect=selection.best_step if selection is not None and keep_best else None,
            extra={"adalora": budget.state()} if budget is not None else None,
        )
        log.checkpointed()
        if ranks.is_main:
            log.console.print(f"checkpoint: {path}")
        return path

    # From the first step to the saved model, a rank that stops advancing is stopped and says where it was.
    with Watchdog(cfg.watchdog.timeout, logs_folder(cfg.output_dir), ranks.rank) as watchdog:
        try:
            progress = loop.train(
                engine,
                task,
                recipe,
                cfg,
                ranks,
                log,
                loader,
                start=start,
                save=save_checkpoint,
                evals=evals,
                after_step=budget.after_step if budget is not None else None,
            )
        except Preempted:
            log.close()
            raise
        # A stop signal from here on (a preemption during the final evaluation or the save) is noted, not fatal: the
        # ranks agree on it between these phases and stop where a resumed run takes over, once a complete checkpoint
        # of the trained state exists (without one, the save ahead is the only copy of the training: it goes on).
        with stop_requests() as after:
            try:
                stop_after_training(after, progress["steps"], cfg, ranks, "the final evaluation")
                metrics: dict[str, float] = {}
                if task.eval is not None:
                    final = progress["steps"]
                    if evals.last is not None and evals.last[0] == final:  # early stopping's own evaluation
                        metrics, outputs = evals.last[1], evals.last[2]
                    else:
                        metrics, outputs = loop.evaluate(engine, task, recipe, cfg, ranks)
                        evals.evaluated(final, metrics, log)
                    if keep_best and selection.best_step != final and evals.best_checkpoint:
                        watchdog.beat(phase="loading the best checkpoint")
                        say(f"keep_best: the model of step {selection.best_step} ({evals.best_checkpoint})")
                        manifest = checkpoint.manifest_of(evals.best_checkpoint)
                        best = checkpoint.Resume(evals.best_checkpoint, manifest, "")
                        checkpoint.load(engine, best, ranks, grad_accum=cfg.train.grad_accum, restore=restore_budget)
                        metrics, outputs = loop.evaluate(engine, task, recipe, cfg, ranks)
                        log.event("best", selection.best_step, **metrics)
                    if ranks.is_main:
                        _write_predictions(os.path.join(cfg.output_dir, "eval_predictions.jsonl"), outputs)
                stop_after_training(after, progress["steps"], cfg, ranks, "saving the model", last=True)
            except Preempted:
                log.close()
                raise
            log.close()
            # The trained weights first: whatever the recipe does after them (generations, say) is optional, and a
            # failure there never loses the training.
            saved = save_model(engine, cfg, task, tokenizer, ranks)
        if recipe.finish is not None:  # e.g. generations from the trained model; on every rank (collective forwards)
            with beating_forwards(engine.module, "finishing (the recipe's finish)"):
                recipe.finish(engine, task, cfg, ranks)
    elapsed = time.time() - t_start
    # Every rank's peak resident memory (ru_maxrss is KiB on Linux): the memory a run really needed per rank.
    peak = [round(kib / 1024, 1) for kib in dist.gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
    summary = {
        "metrics": metrics,
        "peak_rss_mib_per_rank": peak,
        "rss_mib_before_model_per_rank": before_model,
        "peak_rss_mib_loaded_per_rank": loaded_peak,
        "host_memory": "lean" if lean else "fast",
        "compiled_blocks": compiled,
        **_peak_gpu(ranks),
        "model_state_bytes_per_rank": dist.gather_objects(held.largest.bytes if held.largest is not None else None),
        "model_load_seconds": round(load_seconds, 1),
        **progress,
        "seconds": round(elapsed, 1),
        "world_size": ranks.world_size,
        "strategy": choice_name(cfg.strategy),
        "adapter": choice_name(cfg.adapter),
        "trainable_parameters": trainable,
        "saved": os.path.abspath(saved),
        "resumed_from": chosen.path if chosen is not None else None,
        **_selection_summary(selection, evals, keep_best),
        **({"adalora": budget.summary()} if budget is not None else {}),
    }
    if ranks.is_main:
        write_atomic(os.path.join(cfg.output_dir, "summary.json"), json.dumps(summary, indent=2))
        log.table(
            f"{type(cfg).recipe}: done in {elapsed:.0f}s",
            [
                *[(k, f"{v:.4f}") for k, v in metrics.items()],
                ("steps", f"{progress['steps']} ({progress['train_samples_per_s']:.1f} samples/s)"),
                ("memory per rank", _memory_line(peak, summary["model_state_bytes_per_rank"])),
                ("model" if isinstance(cfg.adapter, Full) else "adapter", saved),
                ("metrics", os.path.join(cfg.output_dir, "metrics.jsonl")),
                ("tensorboard", os.path.join(cfg.output_dir, "tensorboard")),
                *tracker_places(cfg.tracking, cfg.output_dir),
            ],
        )
    return summary


def _selection_summary(selection, evals, keep_best: bool) -> dict:
    """summary.json's word on the metric followed: the best evaluation, whether the saved model is it, and the step
    early stopping ended at."""
    if selection is None:
        return {}
    best = {"metric": selection.metric, "higher_is_better": selection.higher}
    best |= {"step": selection.best_step, "value": selection.best_value, "saved": keep_best}
    if keep_best:
        best["checkpoint"] = evals.best_checkpoint
    return {"best": best, "stopped_early_at": evals.stopped_at}


def _gpu_view(cfg: RunConfig, task, ranks) -> dict:
    """What the live view shows on a GPU rank besides the CPU's figures: allocated and reserved memory, and MFU
    from the planner's model FLOPs per token (launcher.timing, at data.max_length) and the GPU's peak."""
    import torch

    from launcher.counting import cached_count, planning_config
    from launcher.timing import flops_per_token
    from launcher.worker.live import peak_tflops

    device = ranks.device

    def memory() -> str:
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        return f"GPU {allocated / 2**30:.1f} GiB allocated, {reserved / 2**30:.1f} GiB reserved"

    flops = None
    try:
        config = planning_config(cfg.model)
        heads = tuple(task.heads)
        counts = cached_count(config, heads)
        flops = flops_per_token(counts, config, cfg, getattr(cfg.data, "max_length", 512), heads)["model"]
    except (ConfigError, OSError, KeyError, ValueError):  # a model the planner cannot count: no MFU, the rest shown
        pass
    return {"memory": memory, "flops_per_token": flops, "peak_tflops": peak_tflops(torch.cuda.get_device_name(device))}


def _peak_gpu(ranks) -> dict:
    """Every GPU rank's peak of allocated device memory (torch's caching allocator), in MiB."""
    import torch

    from launcher.worker import dist

    if ranks.device.type != "cuda":
        return {}
    peak = round(torch.cuda.max_memory_allocated(ranks.device) / 2**20, 1)
    return {"peak_gpu_mib_per_rank": dist.gather_objects(peak)}


def _memory_line(peak_mib: list[float], held: list[dict | None]) -> str:
    """'peak RSS 1234 MiB, model state 5.52 GiB held (rank 1)': the rank with the highest peak."""
    rank = max(range(len(peak_mib)), key=lambda r: peak_mib[r])
    line = f"peak RSS {peak_mib[rank]:.0f} MiB"
    state = held[rank] if rank < len(held) else None
    if state:
        total = sum(sum(where.values()) for where in state.values())
        shown = f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"
        line += f", model state {shown} held (rank {rank})"
    return line


def _write_predictions(path: str, outputs: dict) -> None:
    rows = zip(*[[(k, v.tolist()) for v in values] for k, values in outputs.items()])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            record = dict(row)
            record["index"] = int(record["index"])
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
