"""strategy=auto from the memory plan (launcher/planning/auto_choice.py), through build_plan with a launch environment
passed in: GPUs of a given memory, DeepSpeed's runner or not (no GPU needed)."""

from __future__ import annotations

import pytest

from launcher.choices import Auto, Ddp, Fsdp, Zero
from launcher.errors import ConfigError
from launcher.job import LaunchEnv
from launcher.plan import build_plan
from launcher.recipe import Recipe
from tests.conftest import ROOT

GiB = 2**30
SFT = ["model=random:llama-3-8b", "train.micro_batch_size=4"]


def plan(tmp_path, overrides: list[str], **env):
    gpus = env.pop("gpus", 8)
    settings = dict(world_size=gpus, local_world_size=gpus, cuda=True, gpus=gpus, bf16_supported=True)
    settings.update(gpu_memory=80 * GiB, host_memory=1024 * GiB)
    settings.update(env)
    recipe = Recipe.load(str(ROOT / "recipes/qlora_sft.py"))
    return build_plan(recipe, [*overrides, f"output_dir={tmp_path / 'run'}"], LaunchEnv(**settings))


def test_auto_takes_the_cheapest_row_that_fits_and_says_the_runner_up(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    lora = plan(tmp_path, [*SFT, "adapter=lora"])
    assert isinstance(lora.config.strategy, Ddp)  # an 8B LoRA replica fits an 80 GiB GPU: no sharding needed
    assert lora.notes[0].startswith("strategy=auto: ddp (strategy=ddp), the cheapest that plans within 90%")
    assert "runner-up zero1" in lora.notes[0]
    full = plan(tmp_path, [*SFT, "adapter=full"])  # 16 bytes a parameter: 128 GB whole, so not DDP
    assert isinstance(full.config.strategy, Zero) and full.config.strategy.stage in (1, 2)
    small = plan(tmp_path, [*SFT, "adapter=full"], gpu_memory=24 * GiB)  # a smaller GPU: shard and offload
    s = small.config.strategy
    assert (isinstance(s, Fsdp) and s.offload_params == "cpu") or (isinstance(s, Zero) and s.stage == 3)
    assert "24.0 GiB per GPU" in small.notes[0]


def test_under_deepspeeds_runner_auto_picks_among_zero_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    p = plan(tmp_path, [*SFT, "adapter=qlora"], deepspeed_runner=True)  # DDP would fit; the runner starts ZeRO
    assert isinstance(p.config.strategy, Zero) and "strategy=auto: zero" in p.notes[0]
    offloaded = plan(tmp_path, [*SFT, "adapter=full"], deepspeed_runner=True, gpu_memory=24 * GiB)
    assert isinstance(offloaded.config.strategy, Zero) and offloaded.config.strategy.offload_optimizer == "cpu"
    assert offloaded.config.optimizer.name == "cpu_adam"  # ZeRO-Offload steps on the host with DeepSpeed's Adam


def test_auto_refuses_what_fits_nowhere_and_keeps_its_fixed_choice_on_cpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"strategy=auto: no strategy fits 8.0 GiB per GPU .* `launcher plan`"):
        plan(tmp_path, ["model=random:llama-3-8b", "adapter=full"], gpu_memory=8 * GiB)  # micro-batch 32
    cpu = plan(tmp_path, [*SFT, "adapter=lora"], cuda=False, gpus=2, gpu_memory=0)
    assert isinstance(cpu.config.strategy, Ddp) and not any("strategy=auto" in n for n in cpu.notes)
    named = plan(tmp_path, [*SFT, "adapter=lora", "strategy=zero3"])  # a named strategy is never replaced
    assert isinstance(named.config.strategy, Zero) and named.config.strategy.stage == 3 and not named.notes


def test_auto_on_gpus_without_bf16_plans_the_precision_the_run_uses(tmp_path, monkeypatch):
    """A V100 or T4: precision=auto is fp32 there, and strategy=auto plans fp32 (not fp16, which the run would never
    use): the same choice and figures as precision=fp32 given."""
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    v100 = dict(bf16_supported=False, gpu_memory=48 * GiB)
    auto = plan(tmp_path, [*SFT, "adapter=lora"], **v100)
    given = plan(tmp_path, [*SFT, "adapter=lora", "precision=fp32"], **v100)
    assert auto.config.precision == "fp32" and auto.config.strategy == given.config.strategy
    assert auto.notes[0] == given.notes[0] and auto.notes[0].startswith("strategy=auto: ")
    half = plan(tmp_path, [*SFT, "adapter=lora", "precision=fp16"], **v100)
    assert half.notes[0] != auto.notes[0], "fp16 plans other figures: the check above means something"


def test_resolve_decides_every_auto_once_in_one_order_as_build_plan_does(tmp_path, monkeypatch):
    """resolve_noted: precision, run directory and metric first, then the strategy from the memory plan of that
    precision: the same configuration and note build_plan ends with."""
    from launcher.overrides import apply_overrides
    from launcher.plan import resolve_noted

    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    recipe = Recipe.load(str(ROOT / "recipes/qlora_sft.py"))
    settings = [*SFT, "adapter=lora", f"output_dir={tmp_path / 'run'}"]
    env = LaunchEnv(world_size=8, local_world_size=8, cuda=True, gpus=8, bf16_supported=False,
                    gpu_memory=48 * GiB, host_memory=1024 * GiB)  # fmt: skip
    cfg, notes = resolve_noted(apply_overrides(recipe.Config(), settings), env)
    assert cfg.precision == "fp32" and cfg.train.metric_for_best == "loss" and not isinstance(cfg.strategy, Auto)
    built = build_plan(recipe, settings, env)
    assert built.config.strategy == cfg.strategy and built.notes[0] == notes[0]
