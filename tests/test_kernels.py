"""launcher.kernels against their pure-PyTorch references, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.kernels.fused_ce import linear_cross_entropy, reference
from tests.conftest import ROOT, why_failed


def _case(tokens=37, hidden=16, vocab=50, seed=0, ignored=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    y = torch.randint(0, vocab, (2, tokens), generator=g)
    y[0, :ignored] = -100  # a prompt: no labels
    return h, w, y


def _grads(fn, h, w, y, train_weight):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_(train_weight)
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 100, 0])
def test_fused_linear_cross_entropy_equals_eager_loss_and_gradients_within_1e_5(chunk, train_weight):
    h, w, y = _case()
    fused = _grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, w, y, train_weight)
    eager = _grads(reference, h, w, y, train_weight)
    torch.testing.assert_close(fused[0], eager[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[1], eager[1], rtol=0, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(fused[2], eager[2], rtol=0, atol=1e-5)
    else:
        assert fused[2] is None and eager[2] is None
    assert fused[1].abs().sum() > 0 and fused[1][0, :5].abs().sum() == 0  # unlabelled tokens get no gradient


def test_the_gradient_scales_with_the_incoming_one_and_no_grad_computes_the_loss_alone():
    h, w, y = _case()
    hh = h.clone().requires_grad_()
    (3.0 * linear_cross_entropy(hh, w, y, chunk=8)).backward()
    plain = _grads(reference, h, w, y, False)[1]
    torch.testing.assert_close(hh.grad, 3.0 * plain, rtol=0, atol=1e-5)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    torch.testing.assert_close(loss, reference(h, w, y), rtol=0, atol=1e-5)
    assert not loss.requires_grad


def test_a_batch_without_labels_has_loss_0_and_no_gradient():
    h, w, y = _case()
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, torch.full_like(y, -100))
    loss.backward()
    assert loss.item() == 0.0 and hh.grad.abs().sum() == 0


def test_the_op_passes_opcheck_and_compiles_in_one_graph():
    """registered with torch.library.custom_op: its fake (meta) function and autograd agree with it, and
    torch.compile takes the whole loss as one graph (fullgraph=True fails on a graph break)."""
    h, w, y = _case()
    hh = h.reshape(-1, h.shape[-1]).clone().requires_grad_()
    torch.library.opcheck(torch.ops.launcher.linear_ce.default, (hh, w, y.reshape(-1), -100, 8, 1))
    compiled = torch.compile(
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk=8), backend="aot_eager", fullgraph=True
    )
    fused = _grads(compiled, h, w, y, True)
    eager = _grads(reference, h, w, y, True)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_negative_chunk_is_refused_with_the_value():
    h, w, y = _case()
    with pytest.raises(ValueError, match="chunk=-1"):
        linear_cross_entropy(h, w, y, chunk=-1)


def test_qlora_sft_with_kernels_fused_ce_trains_the_same_losses_as_without(ranks1, tmp_path):
    """The recipe's switch: the same run with the fused loss in the output layer, step for step."""
    losses, calls = {}, {}
    for fused in ("false", "true"):
        out = tmp_path / fused
        # qlora_sft itself, with a count of the forwards whose loss the fused kernel computed.
        settings = [f"kernels.fused_ce={fused}", "train.max_steps=2", "train.log_every=1", "train.micro_batch_size=4"]
        settings += ["data.max_length=256", "data.max_train_rows=32", "data.eval=", "data.generations=0"]
        proc = ranks1.run(str(ROOT / "tests/helpers/counted_sft.py"), [*settings, f"output_dir={out}"], cwd=tmp_path)
        assert proc.returncode == 0, why_failed(proc)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[fused] = [r["loss"] for r in lines if r["split"] == "train"]
        calls[fused] = json.loads((out / "fused_ce_calls.json").read_text())
    assert calls == {"false": 0, "true": 2}, "kernels.fused_ce=true trains each step through the fused loss"
    assert len(losses["true"]) == 2 and losses["true"][0] > losses["true"][-1]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4), losses
