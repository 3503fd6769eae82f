"""Parameters counted on the meta device from a config.json alone (launcher/planning/counting.py): the shipped
shapes give their published parameter counts exactly and build to the planner's count, a 70B shape in seconds with no
weight allocated; LoRA's and DoRA's trainable counts (choices.adapters.lora_tensors, the formula the planner uses)
are peft's own on a real model; a 4-bit weight's bytes are bitsandbytes' own."""

from __future__ import annotations

import time

import pytest
import torch

from launcher.planning.counting import count, four_bit_constants, load_shape, shipped_shapes

# Published parameter counts (the models' cards / safetensors metadata).
PUBLISHED = {
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,  # tied input and output embeddings, counted once
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "bert-base": 109_482_240,  # bert-base-uncased: the encoder with its pooler
}


OURS = {"llama-tiny", "qwen2-tiny"}
"""Shipped shapes of no published model: the tiny ones tests and demos train."""


def test_every_shipped_shape_has_its_published_count():
    assert sorted(set(PUBLISHED) | OURS) == shipped_shapes()
    for name, total in PUBLISHED.items():
        assert count(load_shape(name)).total == total, name


@pytest.mark.parametrize("name", shipped_shapes())
def test_every_shipped_shape_builds_to_the_planners_count(name):
    """The model a run builds (random:NAME for a causal shape, the encoder otherwise), on the meta device, holds the
    parameters the planner counts for that model= value: one registry, one count."""
    from launcher.models import is_causal, random_config
    from launcher.planning.counting import model_class, planning_config

    shape = load_shape(name)
    if is_causal(shape):
        model = f"random:{name}"
        config = random_config(model, vocab_size=shape["vocab_size"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        auto = model_class(shape)[0]
    else:
        model = name
        auto, config = model_class(shape)
    with torch.device("meta"):
        built = auto.from_config(config)
    assert sum(p.numel() for p in built.parameters()) == count(planning_config(model)).total
    assert built.config.tie_word_embeddings == shape.get("tie_word_embeddings", built.config.tie_word_embeddings)


def test_a_70b_shape_is_counted_in_seconds_without_any_weight(monkeypatch):
    made = []
    real_empty = torch.empty

    def watched(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.device.type != "meta" and tensor.numel() > 1_000_000:
            made.append(tensor.shape)
        return tensor

    monkeypatch.setattr(torch, "empty", watched)
    start = time.perf_counter()
    counts = count(load_shape("llama-3-70b"))
    assert time.perf_counter() - start < 5
    assert counts.total == PUBLISHED["llama-3-70b"] and not made
    assert counts.largest_block == 855_654_400  # one decoder layer: what ZeRO-3 and FSDP gather at once
    # LoRA r=16 on every linear layer but lm_head: 80 layers x 7 projections.
    assert len(counts.targets(["all-linear"])) == 80 * 7


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_lora_trainable_parameters_are_peft_s_own_count(dora, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**load_shape("llama-3.2-1b"), "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
             "tie_word_embeddings": False}  # fmt: skip
    planned = count(shape).lora_parameters(8, targets, dora=dora)
    config = {k: v for k, v in shape.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **config))
    names = sorted({t.name.rsplit(".", 1)[-1] for t in count(shape).targets(targets)})
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=names, use_dora=dora))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert planned == trained > 0
    assert "lm_head" not in names


@pytest.mark.parametrize("shape", [(256, 512), (1024, 4096), (4096, 4096), (1000, 333)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_a_four_bit_weights_bytes_are_what_bitsandbytes_holds(shape, double_quant):
    import bitsandbytes.functional as F

    weight = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    held = packed.numel() * packed.element_size()
    while state is not None:  # what the live state holds (a saved one drops the nested offset tensor)
        live = (state.absmax, state.code, state.offset)
        held += sum(t.numel() * t.element_size() for t in live if torch.is_tensor(t))
        state = state.state2
    assert weight.numel() / 2 + four_bit_constants(weight.numel(), double_quant) == held  # packed: 2 per byte
