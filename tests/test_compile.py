"""compile=true: each transformer block compiled in place by torch.compile, the same values as eager."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from launcher.errors import ConfigError
from tests.conftest import run, why_failed


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    return LlamaForCausalLM(config)


@pytest.mark.long
def test_compiled_blocks_give_eager_losses_and_gradients_under_the_same_names():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from launcher.worker.compiled import compile_blocks

    eager = _tiny_llama()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, (LlamaDecoderLayer,)) == 2
    assert list(compiled.state_dict()) == list(eager.state_dict())  # saved files are an eager run's
    for length in (8, 13, 21):  # new lengths: recompiled (dynamic shapes), still the same values
        ids = torch.randint(0, 64, (2, length))
        losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
        for m, loss in zip((eager, compiled), losses):
            m.zero_grad()
            loss.backward()
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in compiled.model.layers)


def test_a_model_without_block_classes_is_refused_naming_the_setting():
    from launcher.worker.compiled import compile_blocks

    with pytest.raises(ConfigError, match="compile=true: Sequential names no transformer block classes"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), ())


def _losses(out) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["split"] == "train"]


@pytest.mark.long
def test_a_qlora_run_with_compiled_blocks_trains_as_the_eager_one(tmp_path):
    """qlora_sft on random llama-tiny (4-bit base, LoRA on every linear layer) in one process, eager and with
    compile=true: the same losses step by step (the same seed, data and batches); the summary says what was
    compiled."""
    from tests.test_sft import RECIPE, _rows

    rows = [{"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(i + 1))} for i in range(24)]
    train = _rows(tmp_path / "train.jsonl", rows)
    runs = {}
    for name, flag in (("eager", "compile=false"), ("compiled", "compile=true")):
        out = tmp_path / name
        settings = [
            f"data.train={train}", "data.eval=", "data.generations=0", "tokenizer_vocab=300", "train.max_steps=4",
            "train.micro_batch_size=4", "train.log_every=1", flag, f"output_dir={out}",
        ]  # fmt: skip
        proc = run(["python", RECIPE, *settings], cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, why_failed(proc)
        runs[name] = (out, json.loads((out / "summary.json").read_text()))
    (eager, e), (compiled, c) = runs["eager"], runs["compiled"]
    assert e["compiled_blocks"] == 0 and c["compiled_blocks"] == 4  # llama-tiny's 4 decoder layers
    first, later = _losses(eager), _losses(compiled)
    assert len(first) == len(later) == 4
    assert later[0] == pytest.approx(first[0], rel=1e-5)  # the same weights: fused kernels, the same loss
    # Then within 1e-3 (measured 4e-4 at step 4): Adam divides by the gradients' own scale, so rounding-level
    # differences in tiny gradients become lr-sized differences in their weights.
    assert later[1:] == pytest.approx(first[1:], rel=1e-3) and later[-1] < later[0]
    assert (compiled / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000
