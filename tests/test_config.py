"""Configuration: overrides, choices, serialization, docstrings, resolution and validation (no processes)."""

from __future__ import annotations

import dataclasses

import pytest

from launcher.checks import validate
from launcher.choices import ADAPTERS, OPTIMIZERS, Auto, Ddp, Fsdp, Full, Zero
from launcher.config import RunConfig, TrainConfig
from launcher.errors import ConfigError
from launcher.overrides import apply_overrides, describe, field_docs, from_dict, parse_value, to_dict
from launcher.plan import LaunchEnv, Plan, resolve
from launcher.recipe import load_recipe, parse_worker_argv
from tests.conftest import RECIPE


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


def test_overrides_set_typed_values_at_dotted_paths(recipe):
    cfg = apply_overrides(
        recipe.Config(),
        [
            "train.lr=3e-4",
            "train.max_steps=7",
            "seed=1",
            "data.text_field=review",
            "output_dir=/tmp/x",
            "precision=bf16",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.seed == 1
    assert cfg.data.text_field == "review" and cfg.output_dir == "/tmp/x" and cfg.precision == "bf16"
    assert recipe.Config().train.lr == 1e-3, "overrides must not touch the defaults"


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ddp", Ddp()),
        ("zero0", Zero(stage=0)),
        ("zero1", Zero(stage=1)),
        ("zero2", Zero(stage=2)),
        ("zero3", Zero(stage=3)),
        ("fsdp", Fsdp()),
        ("auto", Auto()),
    ],
)
def test_strategy_is_one_typed_field(recipe, name, expected):
    cfg = apply_overrides(recipe.Config(), [f"strategy={name}"])
    assert cfg.strategy == expected


def test_choice_refinements_apply_after_the_choice_whatever_the_order(recipe):
    cfg = apply_overrides(
        recipe.Config(),
        ["strategy.reshard_after_forward=false", "strategy=fsdp", "adapter.r=4", "adapter.target_modules=query,value"],
    )
    assert cfg.strategy == Fsdp(reshard_after_forward=False)
    assert cfg.adapter.r == 4 and cfg.adapter.target_modules == ["query", "value"]
    assert isinstance(apply_overrides(recipe.Config(), ["adapter=full"]).adapter, Full)


def test_refining_a_field_of_another_choice_says_which_choice(recipe):
    with pytest.raises(ConfigError, match=r"strategy.reshard_after_forward applies to strategy=fsdp.*is zero2"):
        apply_overrides(recipe.Config(), ["strategy=zero2", "strategy.reshard_after_forward=false"])


def test_unknown_keys_suggest_close_names_and_all_problems_come_together(recipe):
    with pytest.raises(ConfigError) as e:
        apply_overrides(recipe.Config(), ["train.lrr=1", "data.text_feild=x", "strategy=zero9", "train.epochs=two"])
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    assert "unknown setting 'train.lrr': did you mean train.lr" in text
    assert "did you mean data.text_field" in text
    assert "strategy=zero9: unknown strategy; choose one of ddp, zero0, zero1, zero2, zero3, fsdp, auto" in text
    assert "train.epochs=two: expected a whole number" in text


@pytest.mark.parametrize(
    "raw,hint,value",
    [
        ("true", bool, True),
        ("OFF", bool, False),
        ("12", int, 12),
        ("1e-4", float, 1e-4),
        ("none", int | None, None),
        ("a,b", list[str], ["a", "b"]),
    ],
)
def test_parse_value(raw, hint, value):
    assert parse_value(raw, hint, "k") == value


def test_malformed_override_is_refused(recipe):
    with pytest.raises(ConfigError, match="write overrides as key=value"):
        apply_overrides(recipe.Config(), ["train.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(recipe.Config(), ["train=3"])


def test_json_round_trip_keeps_choices_and_recipe_fields(recipe):
    cfg = apply_overrides(recipe.Config(), ["strategy=zero3", "adapter.r=8", "data.max_length=64"])
    again = from_dict(recipe.Config, to_dict(cfg))
    assert again == cfg and again.strategy == Zero(stage=3)
    plan = Plan(recipe=RECIPE, name="lora_cls", world_size=2, local_world_size=2, config=cfg)
    again = Plan.from_json(plan.to_json(), recipe.Config)
    assert again == plan and again.config == cfg and isinstance(again.config, recipe.Config)


def _all_config_classes(recipe):
    seen, todo = [], [recipe.Config, RunConfig, TrainConfig, Ddp, Zero, Fsdp, *ADAPTERS.values(), *OPTIMIZERS.values()]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                todo.append(type(default))
    return seen


def test_every_field_has_a_docstring(recipe):
    for cls in _all_config_classes(recipe):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    rows = {path: doc for path, _, doc in describe(recipe.Config())}
    assert "strategy" in rows and "train.lr" in rows and rows["data.text_field"]


def test_resolve_picks_auto_from_the_launch_environment(recipe):
    cfg = recipe.Config()
    assert resolve(cfg, LaunchEnv(world_size=2)).strategy == Ddp()
    assert resolve(cfg, LaunchEnv(world_size=2, deepspeed_runner=True)).strategy == Zero(stage=2)
    assert resolve(cfg, LaunchEnv()).precision == "fp32"
    assert resolve(cfg, LaunchEnv(cuda=True, bf16_supported=True)).precision == "bf16"
    assert resolve(cfg, LaunchEnv(now=0)).output_dir.startswith("runs/lora_cls-19")
    assert resolve(cfg, LaunchEnv()).train.metric_for_best == "accuracy"  # the recipe's main metric
    explicit = apply_overrides(cfg, ["strategy=fsdp", "precision=fp32", "output_dir=o", "train.metric_for_best=f1"])
    assert resolve(explicit, LaunchEnv(cuda=True, bf16_supported=True, deepspeed_runner=True)) == explicit


def test_validate_collects_every_problem(recipe):
    cfg = apply_overrides(
        recipe.Config(),
        [
            "train.lr=0",
            "train.micro_batch_size=0",
            "train.warmup_ratio=1.5",
            "adapter.r=0",
            "strategy=zero2",
            "strategy.stage=5",
            "data.max_train_rows=-1",
            "data.max_eval_rows=-2",
        ],
    )
    problems = validate(cfg)
    assert "data.max_train_rows=-1: use 0 for all rows" in problems
    assert "data.max_eval_rows=-2: use 0 for all rows" in problems
    assert any(p.startswith("train.lr=0.0") for p in problems)
    assert any(p.startswith("train.micro_batch_size=0") for p in problems)
    assert any(p.startswith("train.warmup_ratio=1.5") for p in problems)
    assert any(p.startswith("adapter.r=0") for p in problems)
    assert any(p.startswith("strategy.stage=5") for p in problems)
    assert validate(recipe.Config()) == []


@pytest.mark.parametrize(
    "argv,overrides,plan,ds",
    [
        (["a=1", "--local_rank=1"], ["a=1"], None, True),
        (["--local_rank", "0", "a=1"], ["a=1"], None, True),
        (["--plan", "p.json"], [], "p.json", False),
        (["x=2"], ["x=2"], None, False),
    ],
)
def test_worker_argv_accepts_deepspeed_local_rank(argv, overrides, plan, ds):
    args = parse_worker_argv(argv)
    assert (args.overrides, args.plan_path, args.deepspeed_runner) == (overrides, plan, ds)


def test_worker_argv_refuses_unknown_flags():
    with pytest.raises(ConfigError, match="unknown flag '--lr'"):
        parse_worker_argv(["--lr", "3"])
