"""A rank's host memory in training: ZeRO-3's 4-bit layers let go of their gathered weights after use,
ZeRO-3 keeps about one block gathered, and a CPU rank gives freed heap back between the parts of each block."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from launcher.config import RunConfig
from launcher.overrides import apply_overrides


def _4bit_layer(bias: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=bias, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    weight = torch.randn(48, 64) * 0.1
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer)._quantize("cpu")
    layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(48), requires_grad=True)
    return layer


def _run(layer, x):
    y = layer(x)
    gathered = StorageWeakRef(layer.weight.data.untyped_storage())
    packed = layer.weight.data.clone()
    layer.weight.data = torch.empty(0, dtype=packed.dtype)  # what ZeRO-3 does to release a gathered parameter
    freed = gathered.expired()
    layer.weight.data = packed  # ...and to gather it again before the layer's backward
    y.square().sum().backward()
    return y.detach(), freed


@pytest.mark.parametrize("bias", [False, True])
def test_zero3_4bit_layer_frees_its_gathered_weight_and_gives_bitsandbytes_gradients(bias):
    import types

    from launcher.worker.strategies.zero_four_bit import forward_4bit

    x = torch.randn(2, 5, 64)
    plain = _4bit_layer(bias)
    x_plain = x.clone().requires_grad_(True)
    y_plain, freed_plain = _run(plain, x_plain)
    # bitsandbytes keeps a view of the weight's data from forward to backward: its storage outlives the release.
    assert not freed_plain

    ours = _4bit_layer(bias)
    ours.forward = types.MethodType(forward_4bit, ours)
    x_ours = x.clone().requires_grad_(True)
    y_ours, freed_ours = _run(ours, x_ours)
    assert freed_ours  # released means freed: nothing else holds the gathered storage
    assert torch.equal(y_ours, y_plain)
    assert torch.allclose(x_ours.grad, x_plain.grad, rtol=1e-5, atol=1e-6)
    assert x_ours.grad.abs().sum() > 0
    if bias:
        assert torch.allclose(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)


def test_zero3_keeps_about_one_block_gathered():
    from launcher.worker.strategies.zero_config import deepspeed_config

    cfg = apply_overrides(RunConfig(model="m", precision="fp32"), ["strategy=zero3"])
    zero = deepspeed_config(cfg, 2, hidden_size=64, block_numel=12345)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 12345
    # A dry run has no model: DeepSpeed's own defaults, and no guessed numbers, are what it shows.
    zero = deepspeed_config(cfg, 2)["zero_optimization"]
    assert "stage3_max_live_parameters" not in zero and "reduce_bucket_size" not in zero
    zero2 = apply_overrides(RunConfig(model="m", precision="fp32"), ["strategy=zero2"])
    assert "stage3_max_live_parameters" not in deepspeed_config(zero2, 2, block_numel=12345)["zero_optimization"]


def test_largest_block_is_counted_on_a_model_built_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from launcher import empty_weights
    from launcher.worker.strategies.zero import _largest_block_numel

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=99
    )
    with empty_weights():
        model = LlamaForCausalLM(config)
    block = model.model.layers[0]
    assert _largest_block_numel(model, (LlamaDecoderLayer,)) == sum(p.numel() for p in block.parameters()) > 0
    assert _largest_block_numel(model, ()) is None


def test_host_memory_is_lean_when_set_or_for_a_large_model_and_fast_otherwise():
    from launcher.worker.memory import LEAN_FROM_PARAMETERS, lean

    assert lean("lean", 1000) and not lean("fast", 10**10)
    assert lean("auto", LEAN_FROM_PARAMETERS) and lean("auto", 1_100_000_000)
    assert not lean("auto", LEAN_FROM_PARAMETERS - 1) and not lean("auto", 23_000_000)  # MiniLM


def test_heap_is_trimmed_in_forward_and_in_the_recomputation_that_starts_each_backward(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from launcher.worker import memory

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(torch.is_grad_enabled()))
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50
    )
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    hooked = memory.trim_between_blocks(model, (LlamaDecoderLayer,))
    assert hooked == 2 * len(list(model.model.layers[0].children()))
    ids = torch.randint(0, 50, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    in_forward = len(calls)
    assert in_forward == hooked
    loss.backward()
    # Checkpointing recomputes each block inside backward: its parts start again, and the heap is trimmed again.
    assert len(calls) > in_forward


def test_shards_are_written_as_tensors_come_and_indexed_for_transformers(tmp_path):
    from safetensors.torch import load_file

    from launcher.shards import INDEX, write_shards

    made = []

    def tensors():  # a generator: each tensor made only when the writer asks for it
        for i in range(5):
            made.append(i)
            yield f"layer.{i}.weight", torch.full((256, 256), float(i))  # 256 KiB each

    index = write_shards(str(tmp_path), tensors(), shard_mb=1)  # 1 MiB: four tensors fill a shard
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX]
    assert made == [0, 1, 2, 3, 4] and index["metadata"]["total_size"] == 5 * 256 * 256 * 4
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[name], torch.full((256, 256), float(name.split(".")[1])))
    assert list(load_file(str(tmp_path / "model-00002-of-00002.safetensors"))) == ["layer.4.weight"]
