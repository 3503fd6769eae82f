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
from launcher.checks import batch_larger_than_data, check
from launcher.choices import Auto, Ddp, Zero
from launcher.config import RunConfig, default_output_dir
from launcher.data.files import forget_reads, rows_read
from launcher.errors import ConfigError
from launcher.job import Job, LaunchEnv
from launcher.overrides import apply_overrides, from_dict, split_override, to_dict
from launcher.planning.auto_choice import choose_strategy
from launcher.settings import ignored

if TYPE_CHECKING:
    from launcher.recipe import Recipe

__all__ = ["LaunchEnv", "Plan", "build_plan", "check_job", "read_plan", "resolve"]


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
    plan's choice, said in a note (planning.auto_choice); else the fixed one, ZeRO-2 under DeepSpeed's runner, DDP
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
