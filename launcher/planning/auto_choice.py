"""`strategy=auto` on GPUs: the cheapest strategy the memory plan fits (planning.rows), said with the runner-up.

On GPUs of known memory the plan of `launcher plan` is made for this job (its nodes, processes per node, one GPU's
memory, the host's), and auto takes its recommended row: the first candidate, cheapest first, that plans within
SAFETY of a GPU. Under DeepSpeed's own runner only ZeRO rows are candidates (its runner starts ZeRO engines). On a
CPU, or when the model cannot be counted from a config.json, auto keeps its fixed choice (plan.resolve: ZeRO-2
under DeepSpeed's runner, else DDP): CPU ranks share one host's memory, and none of them fills a GPU.
"""

from __future__ import annotations

import dataclasses

from launcher.choices import Auto
from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.job import LaunchEnv

GiB = 2**30
DEFAULT_HOST = 1024 * GiB
"""The host's memory when the job does not know it (the plan's default)."""


def choose_strategy(cfg: RunConfig, env: LaunchEnv) -> tuple[RunConfig, list[str]]:
    """`cfg` with strategy=auto replaced by the plan's choice for `env` (and its overrides: an offload row's
    cpu_adam), with a note that says what was chosen, what it plans per GPU and the runner-up. Unchanged (and no
    note) unless strategy is auto on GPUs of known memory. Raises ConfigError when no candidate fits a GPU at all."""
    if not isinstance(cfg.strategy, Auto) or not env.cuda or not env.gpu_memory:
        return cfg, []
    from launcher.overrides import apply_overrides
    from launcher.planning.counting import cached_count, planning_config
    from launcher.planning.rows import CANDIDATES, SAFETY, Machine, fits, make_plan

    seq_len = getattr(getattr(cfg, "data", None), "max_length", 0)
    try:
        config = planning_config(cfg.model)
        counts = cached_count(config)
    except (ConfigError, ValueError, KeyError) as e:
        return cfg, [f"strategy=auto: the model could not be counted for a memory plan ({e}); the fixed choice holds"]
    if not seq_len:
        return cfg, ["strategy=auto: this recipe has no data.max_length to plan activations by; the fixed choice holds"]
    precision = cfg.precision if cfg.precision != "auto" else env.auto_precision  # as the run will resolve it
    machine = Machine(
        nodes=len(env.hosts) or max(1, env.world_size // max(1, env.local_world_size)),
        gpus_per_node=env.local_world_size,
        gpu_bytes=env.gpu_memory,
        cpu_bytes=env.host_memory or DEFAULT_HOST,
    )
    candidates = [c for c in CANDIDATES if c[0].startswith("zero")] if env.deepspeed_runner else CANDIDATES
    plan = make_plan(dataclasses.replace(cfg, precision=precision), counts, config, machine, seq_len, candidates)
    supported = [r for r in plan.rows if r.state is not None]
    chosen = next((r for r in supported if fits(r, machine, SAFETY)), None)
    why = f"the cheapest that plans within {SAFETY:.0%} of a GPU"
    if chosen is None:  # nothing within the margin: the smallest that fits at all, said as such
        chosen = min((r for r in supported if fits(r, machine)), key=lambda r: r.gpu_bytes, default=None)
        why = f"the smallest plan, above the {SAFETY:.0%} margin: a run this close to full may still run out"
    if chosen is None:
        least = min(supported, key=lambda r: r.gpu_bytes) if supported else None
        smallest = f" (the least: {least.strategy}, {_gib(least.gpu_bytes)} per GPU)" if least else ""
        raise ConfigError(
            f"strategy=auto: no strategy fits {_gib(env.gpu_memory)} per GPU for {cfg.model} with these settings"
            f"{smallest}; `launcher plan` shows each strategy's memory: try adapter=qlora, "
            "activation_checkpointing=true, a smaller train.micro_batch_size, or more GPUs"
        )
    later = supported[supported.index(chosen) + 1 :]
    runner_up = next((r for r in later if fits(r, machine, SAFETY)), None)
    note = (
        f"strategy=auto: {chosen.strategy} ({' '.join(chosen.overrides)}), {why}: {_gib(chosen.gpu_bytes)} of "
        f"{_gib(env.gpu_memory)} per GPU"
    )
    if runner_up is not None:
        note += f"; runner-up {runner_up.strategy}, {_gib(runner_up.gpu_bytes)}"
    note += " (launcher plan shows every row)"
    return apply_overrides(cfg, chosen.overrides), [note]


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
