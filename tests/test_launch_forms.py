"""The same recipe file runs unchanged under all four launch forms, with the same key=value overrides."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launcher.data import load_table
from launcher.job import LaunchEnv
from launcher.plan import build_plan
from launcher.recipe import Recipe
from launcher.tasks.metrics import accuracy, macro_f1
from tests.conftest import RECIPE, ROOT, run, tiny_args, why_failed


def _check_run(out, world: int, strategy: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world and summary["strategy"] == strategy and summary["steps"] == 3
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == [1, 2, 3]
    assert any(r["split"] == "eval" and "f1" in r for r in train)
    last_eval = [r for r in train if r["split"] == "eval"][-1]
    assert {k: v for k, v in last_eval.items() if k not in ("step", "split", "time")} == summary["metrics"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in adapter) and any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    labels = json.loads((out / "adapter" / "labels.json").read_text())
    assert labels["labels"] == ["negative", "positive"]
    from transformers import AutoConfig

    names = AutoConfig.from_pretrained(out / "adapter").id2label  # so a merged model keeps the label names
    assert names == {0: "negative", 1: "positive"}
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["strategy"]["name"] == strategy
    _check_predictions(out, summary["metrics"], config["data"]["eval"], labels["label2id"])
    _check_tensorboard(out, train)


def _check_predictions(out, metrics: dict, eval_source: str, label2id: dict[str, int]) -> None:
    """eval_predictions.jsonl holds every eval row exactly once, with its true label and the argmax of its logits,
    and the summary's metrics are those of these predictions."""
    truth = load_table(eval_source, "data.eval")["label"]  # the tiny eval set: 40 rows, string labels
    preds = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(truth) == 40 and sorted(p["index"] for p in preds) == list(range(len(truth)))
    for p in preds:
        assert set(p) == {"index", "pred", "label", "logits"} and len(p["logits"]) == 2, p
        assert p["label"] == label2id[truth[p["index"]]], p
        assert p["pred"] == max(range(2), key=p["logits"].__getitem__), p
    pred = torch.tensor([p["pred"] for p in preds])
    label = torch.tensor([p["label"] for p in preds])
    assert set(metrics) == {"accuracy", "f1"}
    assert metrics["accuracy"] == accuracy(pred, label)
    assert metrics["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in preds) / len(preds))
    assert metrics["f1"] == macro_f1(pred, label, 2)


def _check_tensorboard(out, records: list[dict]) -> None:
    """One event file, holding every number of metrics.jsonl (as float32) under split/name at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((out / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key not in ("step", "split", "epoch", "time"):
                expected.setdefault(f"{r['split']}/{key}", []).append((r["step"], float(np.float32(value))))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    assert {"train/loss", "eval/accuracy", "eval/f1"} <= set(expected)
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == points, tag


FORMS = {
    "python": (lambda args: [sys.executable, RECIPE, *args], 1, "ddp"),
    "torchrun": (lambda args: ["torchrun", "--standalone", "--nproc_per_node", "2", RECIPE, *args], 2, "fsdp"),
    # The card's own form: DeepSpeed's runner on the repository's `launch` script, which runs the recipe it is given.
    "deepspeed": (
        lambda args: ["deepspeed", "--num_gpus", "2", "--master_port", "29611", "launch", "recipes/lora_cls.py", *args],
        2,
        "zero2",
    ),
    "launcher": (lambda args: ["launcher", "run", RECIPE, "--nproc", "2", *args], 2, "zero3"),
}


@pytest.mark.parametrize("form", FORMS)
def test_launch_form_runs_lora_cls(form, tiny_model, tiny_data, tmp_path):
    make, world, strategy = FORMS[form]
    out = tmp_path / "run"
    extra = ["train.max_steps=3"]
    if form != "deepspeed":  # under DeepSpeed's runner, strategy=auto must resolve to zero2 by itself
        extra.append(f"strategy={strategy if form != 'python' else 'auto'}")
    args = tiny_args(tiny_model, tiny_data, out, *extra)
    proc = run(make(args), cwd=ROOT if form == "deepspeed" else tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    _check_run(out, world, strategy)
    assert "done in" in proc.stdout
    # Every form made its plan with the one build_plan: the same JSON as the pure function gives here, no process.
    env = LaunchEnv(world_size=world, local_world_size=world, deepspeed_runner=form == "deepspeed")
    expected = build_plan(Recipe.load(RECIPE), args, env)
    assert json.loads((out / "config.json").read_text()) == json.loads(expected.to_json())
    if form == "python":  # merging the adapter into its base keeps the label names
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_model, config=AutoConfig.from_pretrained(out / "adapter")
        )
        PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload().save_pretrained(tmp_path / "merged")
        assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == {0: "negative", 1: "positive"}


def test_dry_run_prints_config_commands_and_deepspeed_json_and_writes_nothing(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run(
        [
            "launcher",
            "run",
            RECIPE,
            "--nproc",
            "2",
            "--dry-run",
            *tiny_args(tiny_model, tiny_data, out),
            "strategy=zero3",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert '"name": "zero3"' in text and "resolved plan" in text and '"world_size": 2' in text
    assert text.count("--plan") == 2 and "RANK=1" in text and "MASTER_PORT=" in text
    assert '"stage": 3' in text and '"train_micro_batch_size_per_gpu": 8' in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_eval_every_evaluates_during_training(ranks1, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = ranks1.run(
        RECIPE, tiny_args(tiny_model, tiny_data, out, "train.max_steps=3", "train.eval_every=2"), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    labels = json.loads((out / "adapter" / "labels.json").read_text())
    _check_predictions(out, summary["metrics"], str(tiny_data["test"]), labels["label2id"])  # the last evaluation
    _check_tensorboard(out, records)


MATRIX_CELLS = {
    "fsdp-qlora-8bit-checkpointing": [
        "strategy=fsdp",
        "adapter=qlora",
        "optimizer=adamw8bit",
        "activation_checkpointing=true",
    ],
    "zero2-offload-dora-cpu_adam": [
        "strategy=zero2",
        "strategy.offload_optimizer=cpu",
        "adapter=dora",
        "optimizer=cpu_adam",
    ],
}


@pytest.mark.parametrize("cell", MATRIX_CELLS)
def test_matrix_cells_through_launcher_run(cell, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model, tiny_data, out, "train.max_steps=3", *MATRIX_CELLS[cell])
    proc = run(["launcher", "run", RECIPE, "--nproc", "2", *args], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    _check_run(out, 2, MATRIX_CELLS[cell][0].split("=")[1])
    plan = json.loads((out / "config.json").read_text())["config"]
    settings = dict(o.split("=", 1) for o in MATRIX_CELLS[cell])
    assert plan["adapter"]["name"] == settings["adapter"] and plan["optimizer"]["name"] == settings["optimizer"]
    assert_quiet(proc.stdout + proc.stderr)


NOISE = ("Skipping publisher trust check", "built successfully", "Loading weights", "\r")
"""What libraries print on every run and a person need not read: the kernels hub's offline note, DeepSpeed's op
builds, transformers' loading bar (its carriage returns off a terminal)."""


def assert_quiet(output: str) -> None:
    assert [n for n in NOISE if n in output] == [], output[-3000:]


def test_target_modules_the_model_lacks_stop_with_the_available_names(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model, tiny_data, out, "train.max_steps=1", "adapter.target_modules=q_proj,value")
    proc = run([sys.executable, RECIPE, *args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "adapter.target_modules names q_proj" in proc.stderr and "query" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "adapter").exists()
