"""Adapters in one plain process: quantization settings reach bitsandbytes, all-linear resolves per model, heads stay
full precision and trainable."""

from __future__ import annotations

import pytest
import torch

from launcher.config import RunConfig
from launcher.overrides import apply_overrides
from launcher.worker.adapters import apply_adapter, linear_names, quant_storage
from tests.helpers.matrix_worker import HEADS, TASK_TYPE, batch_for, build_model


def _cfg(*overrides):
    return apply_overrides(RunConfig(model="m", precision="fp32"), list(overrides))


def test_all_linear_resolves_to_each_models_own_layers_without_heads():
    assert linear_names(build_model("llama"), []) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert linear_names(build_model("bert"), ["classifier"]) == ["dense", "key", "query", "value"]


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_settings_reach_bitsandbytes_and_heads_stay_full_precision(quant_type, double_quant):
    import bitsandbytes as bnb

    cfg = _cfg(
        "adapter=qlora",
        f"adapter.quant_type={quant_type}",
        f"adapter.double_quant={str(double_quant).lower()}",
        "adapter.compute_dtype=bf16",
    )
    model = apply_adapter(build_model("bert"), cfg, task_type=TASK_TYPE["bert"], heads=HEADS["bert"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + the pooler
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == quant_type and state.nested == double_quant
        assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
        assert not layer.weight.requires_grad
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.requires_grad and head.weight.dtype == torch.float32
    batch = batch_for("bert", 0)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and head.weight.grad is not None
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0, "the head really learns"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_b)
    assert any(p.grad.abs().sum() > 0 for p in lora_b), "gradients reach LoRA through the 4-bit base"


def test_quant_storage_follows_the_strategy():
    assert quant_storage(_cfg("adapter=qlora", "strategy=ddp")) == torch.uint8
    assert quant_storage(_cfg("adapter=qlora", "strategy=zero3")) == torch.float32
    assert quant_storage(_cfg("adapter=qlora", "strategy=fsdp", "precision=bf16")) == torch.bfloat16
    assert quant_storage(_cfg("adapter=qlora", "strategy=zero2", "adapter.quant_storage=fp16")) == torch.float16


def test_lora8_base_is_int8_and_dora_adds_magnitudes():
    import bitsandbytes as bnb

    model = apply_adapter(build_model("llama"), _cfg("adapter=lora8"), task_type="CAUSAL_LM", heads=[])
    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 7 * 2 and all(m.weight.dtype == torch.int8 for m in int8)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear  # the output embedding is never quantized
    dora = apply_adapter(build_model("llama"), _cfg("adapter=dora"), task_type="CAUSAL_LM", heads=[])
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)


def test_activation_checkpointing_switch_reaches_the_model():
    model = apply_adapter(build_model("llama"), _cfg("activation_checkpointing=true"), task_type="CAUSAL_LM", heads=[])
    assert model.base_model.model.is_gradient_checkpointing
