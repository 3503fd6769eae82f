"""AdaLoRA (adapter=adalora): the rank budget pruned after every optimizer step, alike in one process, under DDP and
under ZeRO-2; refused where parameters are sharded; a recipe's run saves the ranks it kept, in peft's format."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.checks import validate
from launcher.compat import refusals
from launcher.config import RunConfig
from launcher.overrides import apply_overrides
from tests.conftest import ROOT, run_helper, why_failed


def _launch(tmp_path, nproc: int, strategies: str) -> list[dict]:
    out = tmp_path / f"adalora-{nproc}.json"
    run_helper("adalora_worker", [str(out), strategies], cwd=tmp_path, nproc=nproc)
    return json.loads(out.read_text())


@pytest.mark.long
def test_ddp_and_zero2_prune_and_train_as_one_process_does(tmp_path):
    (one,) = _launch(tmp_path, 1, "ddp")
    two = _launch(tmp_path, 2, "ddp,zero2")
    # The budget: 13 BERT linears start at rank 8 (104) and end with 4 each on average (52), the values pruned
    # being the model's least important wherever they are.
    assert one["initial"] == 104 and one["budget"] == 52
    assert 0 < one["total_rank"] <= one["budget"] and len(set(one["ranks"].values())) > 1, one
    for r in two:
        # The issue asks 1e-4 over the first five steps; they agree to float rounding (1e-7). A ZeRO-2 run whose
        # masks never reach DeepSpeed's fp32 masters drifts by 1e-4 at the fifth step.
        assert r["losses"] == pytest.approx(one["losses"], abs=1e-5), (r["strategy"], r["losses"], one["losses"])
        assert r["ranks"] == one["ranks"], r["strategy"]
    assert one["losses"][-1] < one["losses"][0]


@pytest.mark.parametrize("strategy", ["strategy=zero3", "strategy=fsdp"])
def test_sharded_parameters_are_refused_with_the_reason(strategy):
    cfg = apply_overrides(RunConfig(model="tiny"), [strategy, "adapter=adalora"])
    (line,) = refusals(cfg)
    assert "adapter=adalora" in line and "shard" in line and "strategy=zero2 or strategy=ddp" in line, line


@pytest.mark.parametrize(
    "override, words",
    [
        ("adapter.target_r=20", "adapter.target_r=20: the final average rank must be between 1 and adapter.r=12"),
        ("adapter.delta_t=0", "adapter.delta_t=0"),
        ("adapter.beta1=1.0", "adapter.beta1=1.0: a moving-average factor in [0, 1)"),
        ("adapter.orth_reg_weight=-1", "adapter.orth_reg_weight=-1"),
    ],
)
def test_bad_settings_name_the_field(override, words):
    cfg = apply_overrides(RunConfig(model="tiny"), ["strategy=ddp", "adapter=adalora", override])
    assert any(words in p for p in validate(cfg)), validate(cfg)


@pytest.mark.long
def test_a_recipe_run_saves_the_ranks_it_kept_and_reloads_to_its_logits(
    ranks1, tmp_path, tiny_model, tiny_data, capsys
):
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    args = [
        f"model={tiny_model}",
        "adapter=adalora",
        "adapter.r=8",
        "adapter.target_r=2",
        "adapter.tfinal=2",  # the last two steps train at the final ranks
        f"data.train={tiny_data['train']}",
        f"data.eval={tiny_data['test']}",
        "train.micro_batch_size=16",
        "train.max_steps=8",
        "train.lr=5e-3",
        "checkpoint.every_steps=8",
        f"output_dir={out}",
    ]
    proc = ranks1.run(str(ROOT / "recipes/lora_cls.py"), args, cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    budget = json.loads((out / "summary.json").read_text())["adalora"]
    assert 0 < budget["total_rank"] <= budget["budget"] == budget["initial"] // 4, budget

    adapter = out / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    kept = {k.removesuffix(".lora_E"): t.shape[0] for k, t in saved.items() if k.endswith(".lora_E")}
    assert kept == budget["ranks"]
    assert all(bool((t != 0).all()) for k, t in saved.items() if k.endswith(".lora_E")), "a pruned value was saved"
    assert PeftConfig.from_pretrained(adapter).rank_pattern  # what peft resizes the layers by when it loads

    # A plain process: the base, the adapter at its pruned ranks, the logits the run evaluated with.
    tok = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    rows = [json.loads(line) for line in tiny_data["test"].read_text().splitlines()]
    evaluated = {
        r["index"]: r["logits"] for r in map(json.loads, (out / "eval_predictions.jsonl").read_text().splitlines())
    }
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    assert torch.allclose(logits, torch.tensor([evaluated[i] for i in range(len(rows))]), atol=1e-4)

    # `launcher export` of its checkpoint: the adapter at the same ranks, and merged (B (A * E) scaled, pruned
    # values zero), which the export loads back and compares with the trained model's logits itself.
    from launcher import cli

    checkpoint = out / "checkpoints" / "step-00000008"
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    again = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert {k: t.shape for k, t in again.items()} == {k: t.shape for k, t in saved.items()}
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert "checked: loaded back with transformers" in capsys.readouterr().out


def test_a_schedule_with_no_step_to_score_on_is_refused_with_the_fields():
    from launcher.errors import ConfigError
    from launcher.worker.adapters import apply_adapter
    from tests.helpers.matrix_worker import build_model

    cfg = apply_overrides(RunConfig(model="tiny"), ["strategy=ddp", "adapter=adalora", "adapter.tfinal=2"])
    with pytest.raises(ConfigError, match=r"adapter.tinit=0 \+ adapter.tfinal=2 leave too few of the 3 optimizer"):
        apply_adapter(build_model("bert"), cfg, task_type="SEQ_CLS", heads=["classifier"], total_steps=3)
    apply_adapter(build_model("bert"), cfg, task_type="SEQ_CLS", heads=["classifier"], total_steps=4)
