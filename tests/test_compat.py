"""The compatibility table: refusals before launch, the `launcher matrix` grid, and docs/matrix.md kept in sync."""

from __future__ import annotations

import pytest

from launcher import cli
from launcher.checks import check, environment_problems, validate
from launcher.compat import RULES, cells
from launcher.compat_view import render_markdown
from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.overrides import apply_overrides
from launcher.plan import LaunchEnv
from launcher.worker.strategies.zero_config import deepspeed_config
from tests.conftest import RECIPE, ROOT, launcher_cli

UNSUPPORTED = [c for c in cells() if not c.supported]


def _cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(model="m", output_dir="o", precision="fp32"), list(overrides))


def test_docs_page_is_generated_from_the_rules():
    page = (ROOT / "docs" / "matrix.md").read_text()
    assert page == render_markdown(), "docs/matrix.md is stale: run `launcher matrix --markdown > docs/matrix.md`"


def test_the_grid_has_both_kinds_of_cell_and_every_cell_rule_refuses_something():
    all_cells = list(cells())
    assert 100 < len([c for c in all_cells if c.supported]) < len(all_cells)
    used = {i for c in all_cells for i in c.refused_by}
    dead = [RULES[i].what for i, r in enumerate(RULES) if r.cell and i not in used]
    assert dead == [], f"rules that refuse no cell: {dead}"


@pytest.mark.parametrize("cell", UNSUPPORTED, ids=lambda c: f"{c.row}|{c.adapter}|{c.optimizer}".replace(" ", ""))
def test_unsupported_cell_is_refused_before_any_worker_starts(cell, monkeypatch, capsys, tmp_path):
    def no_workers(*_a, **_k):
        raise AssertionError("a worker was started for an unsupported combination")

    monkeypatch.setattr("launcher.launch.execute.run_restarting", no_workers)
    out = tmp_path / "run"
    code = cli.main(["run", RECIPE, "--nproc", "2", *cell.overrides, f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    rule = RULES[cell.refused_by[0]]
    assert "is not supported" in err and rule.reason in " ".join(err.split()), err
    assert f"adapter={cell.adapter}" in err and f"optimizer={cell.optimizer}" in err
    assert not out.exists()


def test_refusal_from_the_command_line_names_the_fix_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = launcher_cli(
        ["run", RECIPE, "--nproc", "2", "strategy=fsdp", "optimizer=cpu_adam", f"output_dir={out}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cpu_adam is DeepSpeed's CPU Adam" in proc.stderr and "strategy.offload_optimizer=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_settings_rules_beyond_the_grid():
    def refused(*overrides):
        return " ".join(validate(_cfg(*overrides)))

    assert "quant_storage" in refused("strategy=zero3", "adapter=qlora", "adapter.quant_storage=uint8")
    assert refused("strategy=zero3", "adapter=qlora", "adapter.quant_storage=fp32") == ""
    assert refused("strategy=zero2", "adapter=qlora", "adapter.quant_storage=uint8") == ""
    assert "only applies to hybrid" in refused("strategy=fsdp", "strategy.shard_group_size=2")
    nvme = ("strategy=zero3", "strategy.offload_optimizer=nvme", "optimizer=cpu_adam")
    assert "strategy.offload_dir=" in refused(*nvme)
    assert "min_8bit_size" in refused("optimizer=adamw8bit", "optimizer.min_8bit_size=-1")


def test_environment_refusals():
    nvme = _cfg("strategy=zero3", "strategy.offload_optimizer=nvme", "optimizer=cpu_adam", "strategy.offload_dir=/nv")
    assert "libaio" in " ".join(environment_problems(nvme, LaunchEnv(world_size=2)))
    assert environment_problems(nvme, LaunchEnv(world_size=2, libaio=True)) == []
    hybrid = _cfg("strategy=fsdp", "strategy.shard=hybrid", "strategy.shard_group_size=3")
    assert "divisor of 4" in " ".join(environment_problems(hybrid, LaunchEnv(world_size=4)))
    assert environment_problems(_cfg("strategy=fsdp", "strategy.shard=hybrid"), LaunchEnv(world_size=4)) == []
    bf16 = _cfg("precision=bf16")
    assert "precision=fp16" in " ".join(environment_problems(bf16, LaunchEnv(cuda=True, bf16_supported=False)))
    fp16 = _cfg("strategy=zero2", "precision=fp16")
    assert "CPU accelerator has no fp16" in " ".join(environment_problems(fp16, LaunchEnv()))
    assert environment_problems(fp16, LaunchEnv(cuda=True, bf16_supported=True)) == []
    assert environment_problems(_cfg("strategy=fsdp", "precision=fp16"), LaunchEnv()) == []
    with pytest.raises(ConfigError) as e:
        check(nvme, LaunchEnv(world_size=2))
    assert "libaio" in e.value.render()


def test_refinement_of_another_strategy_says_which_strategy_it_needs():
    with pytest.raises(ConfigError) as e:
        _cfg("strategy=ddp", "strategy.offload_params=cpu")
    assert "strategy=zero" in e.value.render() and "fsdp" in e.value.render()


def test_deepspeed_json_for_offload_and_fp16():
    ds = deepspeed_config(_cfg("strategy=zero3", "strategy.offload_optimizer=cpu", "strategy.offload_params=cpu"), 2)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    nvme = _cfg("strategy=zero3", "strategy.offload_optimizer=nvme", "strategy.offload_dir=/nv", "precision=fp16")
    ds = deepspeed_config(nvme, 2, cuda=True)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nv"}
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]


def test_launcher_matrix_prints_the_grid():
    proc = launcher_cli(["matrix"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "zero3 offload opt+params" in proc.stdout and "qlora" in proc.stdout and "cpu_adam" in proc.stdout
    assert RULES[0].reason.split(":")[0] in proc.stdout
