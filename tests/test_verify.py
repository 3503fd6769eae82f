"""`launcher plan --verify`: a short real run of one row's cell (2 gloo processes), measured against the plan of
exactly what it ran; a model too large for this machine is probed as a scaled-down one of its family."""

from __future__ import annotations

import json

import pytest

from launcher.config import RunConfig
from launcher.overrides import apply_overrides
from launcher.planning import probe
from launcher.planning.counting import planning_config
from tests.conftest import ROOT, launcher_cli, run, why_failed

GiB = 2**30


def test_a_scaled_down_model_keeps_its_family_s_proportions():
    config = planning_config("random:llama-3-8b")  # 32 layers, hidden 4096, 32 heads over 8 KV heads, vocab 128256
    small = probe.scaled_config(config, layers=2, divide=4)
    assert small["num_hidden_layers"] == 2
    assert small["num_attention_heads"] == 8 and small["num_key_value_heads"] == 2
    assert small["hidden_size"] // small["num_attention_heads"] == config["hidden_size"] // 32  # head size kept
    assert small["intermediate_size"] == config["intermediate_size"] // 4
    assert small["vocab_size"] == 128256 // 4
    assert small["model_type"] == config["model_type"] and small["architectures"] == config["architectures"]
    odd = probe.scaled_config({**config, "num_attention_heads": 12, "num_key_value_heads": 4}, 2, 8)
    assert odd["num_attention_heads"] % odd["num_key_value_heads"] == 0  # grouped attention still groups


def test_a_small_model_is_probed_as_it_is_and_a_large_one_scaled_to_the_machine():
    cfg = apply_overrides(
        RunConfig(model="x"), ["strategy=zero3", "adapter=lora", "train.micro_batch_size=8", "precision=bf16"]
    )
    tiny = planning_config("random:llama-tiny")
    same = probe.setup(tiny, cfg, seq_len=4096, memory=24 * GiB)
    assert same.config is tiny and not same.scaled
    # A micro-batch's tokens are cut to MAX_TOKENS (the sequence first, to the model's positions), fp32 on CPU.
    assert same.seq_len * same.micro_batch <= probe.MAX_TOKENS
    assert "precision=fp32" in same.overrides and any("fp32 (of bf16" in w for w in same.why)
    big = planning_config("random:llama-3-8b")
    scaled = probe.setup(big, cfg, seq_len=512, memory=24 * GiB)
    assert scaled.scaled and scaled.config["num_hidden_layers"] == 2
    assert "scaled-down" in scaled.why[0]
    tight = probe.setup(big, cfg, seq_len=512, memory=4 * GiB)  # less memory: a smaller model of the family
    assert tight.config["hidden_size"] < scaled.config["hidden_size"]


@pytest.mark.long
def test_verify_measures_the_model_state_the_plan_says(tmp_path):
    """The 8B shape's QLoRA under ZeRO-3 is probed as a scaled-down Llama on 2 gloo ranks: every model-state term
    as planned within 2%, the peak resident memory above an idle rank within 20% of the CPU rank's planned total."""
    argv = ["launcher", "plan", "recipes/qlora_sft.py", "model=random:llama-3-8b", "train.micro_batch_size=2"]
    argv += ["activation_checkpointing=true", "--row", "zero3", "--verify", "--json"]
    proc = run(argv, cwd=ROOT, timeout=600, env={"LAUNCHER_CACHE": str(tmp_path)})
    assert proc.returncode == 0, why_failed(proc)
    assert "verifying zero3 on 2 CPU processes" in proc.stderr and "scaled-down" in proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["named_row"]["row"] == "zero3" and plan["named_row"]["max_micro_batch_size"] > 0
    v = plan["verify"]
    assert v["row"] == "zero3" and v["scaled"] and v["world"] == 2
    assert v["parameters"] < probe.MAX_PARAMETERS and v["model"]["num_hidden_layers"] == 2
    assert v["ratio"] == pytest.approx(1, abs=0.02)
    for term in ("params", "grads", "optimizer"):  # 4-bit base, LoRA gradients and AdamW states all held
        assert v["terms"][term]["measured"] > 0
        assert v["terms"][term]["ratio"] == pytest.approx(1, abs=0.02), (term, v["terms"][term])
    assert v["peak_rss"]["ratio"] == pytest.approx(1, abs=0.2), v["peak_rss"]
    assert len(v["losses"]) == probe.STEPS and all(loss == loss for loss in v["losses"])  # finite


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipes/lora_cls.py", "--verify"], "--verify probes causal language models"),
        (["recipes/qlora_sft.py", "model=random:llama-tiny", "--row", "zero9"], "--row zero9: no such row"),
        (["recipes/qlora_sft.py", "model=random:llama-tiny", "--row", "fsdp+offload"], "--row fsdp+offload: strategy"),
    ],
)
def test_bad_verify_input_is_a_usage_error(args, message, tmp_path):
    proc = launcher_cli(["plan", *args], cwd=ROOT, env={"LAUNCHER_CACHE": str(tmp_path)})
    assert proc.returncode == 2, why_failed(proc)
    assert message in proc.stderr and "Traceback" not in proc.stderr
