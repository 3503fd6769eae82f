"""Early stopping (train.early_stop_patience) and the best evaluated model (checkpoint.keep_best)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from launcher.errors import ConfigError
from launcher.selection import Selection, higher_is_better
from tests.conftest import ROOT, tiny_args, why_failed

SCRIPTED = str(ROOT / "tests" / "helpers" / "scripted_cls.py")


def test_the_best_and_the_patience_count():
    s = Selection("accuracy", higher=True, patience=2)
    assert [s.update(step, {"accuracy": v}) for step, v in ((2, 0.5), (4, 0.7), (6, 0.7), (8, 0.65))] == [
        True,
        True,
        False,  # a tie keeps the earlier evaluation
        False,
    ]
    assert (s.best_step, s.best_value, s.since_best, s.stop) == (4, 0.7, 2, True)
    assert "has not improved for 2 evaluation(s) since step 4" in s.why_stopped(8)
    low = Selection("loss", higher=False)
    assert low.update(1, {"loss": 2.0}) and low.update(2, {"loss": 1.5}) and not low.update(3, {"loss": float("nan")})
    assert (low.best_step, low.stop) == (2, False)  # patience 0 never stops
    again = Selection("loss", higher=False, patience=3)
    assert again.restore(low.state()) and (again.best_step, again.since_best) == (2, 1)
    assert not Selection("accuracy", higher=True).restore(low.state())  # another metric's count is not taken
    with pytest.raises(ConfigError, match="train.metric_for_best=acc: the recipe's evaluation gives accuracy, f1"):
        Selection("acc", higher=True).update(1, {"accuracy": 1.0, "f1": 1.0})


def test_which_way_is_better():
    assert higher_is_better("accuracy", "auto") and higher_is_better("f1_PER", "auto")
    assert not higher_is_better("loss", "auto") and not higher_is_better("eval_perplexity", "auto")
    assert not higher_is_better("accuracy", "lower") and higher_is_better("loss", "higher")


def test_settings_that_cannot_work_are_refused_before_launch(tmp_path, tiny_model, tiny_data):
    from launcher.job import LaunchEnv
    from launcher.plan import build_plan
    from launcher.recipe import Recipe

    recipe = Recipe.load(str(ROOT / "recipes" / "lora_cls.py"))

    def plan(*extra: str):
        return build_plan(recipe, tiny_args(tiny_model, tiny_data, tmp_path / "out", *extra), LaunchEnv(now=1e9))

    cases = {
        ("train.early_stop_patience=2",): "train.early_stop_patience compares evaluations during training: "
        "set train.eval_every=N",
        ("checkpoint.keep_best=true", "data.eval="): "checkpoint.keep_best follows an eval metric, but there is "
        "no eval set",
        ("train.early_stop_patience=-1",): "train.early_stop_patience=-1: use 0",
    }
    for extra, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            plan(*extra)
    chosen = plan("train.early_stop_patience=2", "train.eval_every=2").config.train
    assert chosen.metric_for_best == "accuracy"  # the recipe's main metric


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_ends_training_and_keep_best_saves_the_best_evaluated_model(
    ranks1, tmp_path, tiny_model, tiny_data
):
    from safetensors.torch import load_file

    env = {"SCORES": "0.5,0.7,0.6,0.65,0.9"}  # evaluations at steps 2, 4, 6, 8: the best is step 4's
    settings = [
        "train.max_steps=20",
        "train.eval_every=2",
        "train.early_stop_patience=2",
        "train.metric_for_best=score",
        "checkpoint.keep=1",
    ]
    kept, last = tmp_path / "kept", tmp_path / "last"
    for out, extra in ((kept, ["checkpoint.keep_best=true"]), (last, [])):
        proc = ranks1.run(SCRIPTED, tiny_args(tiny_model, tiny_data, out, *settings, *extra), cwd=tmp_path, env=env)
        assert proc.returncode == 0, why_failed(proc)
        assert "early stop at step 8: score has not improved for 2 evaluation(s) since step 4" in proc.stdout
        records = _records(out)
        assert max(r["step"] for r in records if r["split"] == "train") == 8  # no step after the stop
        assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6, 8]  # the stop's eval is not redone
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 8 and summary["stopped_early_at"] == 8
        assert summary["best"] | {"saved": None, "checkpoint": None} == {
            "metric": "score",
            "higher_is_better": True,
            "step": 4,
            "value": 0.7,
            "saved": None,
            "checkpoint": None,
        }

    # keep_best: the step-4 model is evaluated (the score of those weights) and saved; its checkpoint survives keep=1.
    summary = json.loads((kept / "summary.json").read_text())
    best = kept / "checkpoints" / "step-00000004"
    assert summary["metrics"]["score"] == 0.7 and summary["best"]["saved"] is True
    assert summary["best"]["checkpoint"] == str(best) and sorted(os.listdir(kept / "checkpoints")) == [best.name]
    assert [r["step"] for r in _records(kept) if r["split"] == "best"] == [4]
    # The checkpoint carries the count, so a run resumed from it goes on where it stood.
    assert json.loads((best / "manifest.json").read_text())["selection"] == {
        "metric": "score",
        "higher": True,
        "patience": 2,
        "best_step": 4,
        "best_value": 0.7,
        "since_best": 0,
    }
    stored = load_file(best / "trained-00001-of-00001.safetensors")
    saved = load_file(kept / "adapter" / "adapter_model.safetensors")
    assert saved and len(saved) == sum(k.startswith("param/") for k in stored)
    for name, tensor in saved.items():  # peft's saved names drop the adapter's name ("default")
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.weight", f".{part}.default.weight")
        name = name.replace(".classifier.", ".classifier.modules_to_save.default.")
        assert torch.equal(tensor, stored["param/" + name]), name
    # Without keep_best the last step's model is saved; the best is reported, not kept.
    summary = json.loads((last / "summary.json").read_text())
    assert summary["metrics"]["score"] == 0.65 and summary["best"]["saved"] is False
    assert not (last / "checkpoints").exists()


def test_a_run_resumed_mid_count_stops_where_the_uninterrupted_one_does(ranks1, tmp_path, tiny_model, tiny_data):
    """Resumed from step 6 (the best was step 4's 0.7, one evaluation since): the step-8 evaluation is the second
    without improvement, so the run stops there as the uninterrupted one did; a count started afresh would take
    step 8's 0.65 for its best and train on."""
    settings = [
        "train.max_steps=20",
        "train.eval_every=2",
        "train.early_stop_patience=2",
        "train.metric_for_best=score",
        "checkpoint.every_steps=2",
        "checkpoint.keep=10",
    ]
    first, again = tmp_path / "first", tmp_path / "again"
    env = {"SCORES": "0.5,0.7,0.6,0.65,0.9"}
    proc = ranks1.run(SCRIPTED, tiny_args(tiny_model, tiny_data, first, *settings), cwd=tmp_path, env=env)
    assert proc.returncode == 0, why_failed(proc)
    assert json.loads((first / "summary.json").read_text())["stopped_early_at"] == 8
    resume = f"resume={first / 'checkpoints' / 'step-00000006'}"
    env = {"SCORES": "0.65,0.9"}  # the resumed run evaluates from step 8 on
    proc = ranks1.run(SCRIPTED, [*tiny_args(tiny_model, tiny_data, again, *settings), resume], cwd=tmp_path, env=env)
    assert proc.returncode == 0, why_failed(proc)
    assert "early stop at step 8: score has not improved for 2 evaluation(s) since step 4" in proc.stdout
    summary = json.loads((again / "summary.json").read_text())
    assert summary["stopped_early_at"] == 8 and summary["steps"] == 8
    assert (summary["best"]["step"], summary["best"]["value"]) == (4, 0.7)
