"""Every strategy really distributes: 2 gloo ranks, a tiny BERT with LoRA, one fixed batch per rank."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import RECIPE, run_helper

STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def results(tiny_model, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies") / "results.json"
    run_helper("strategy_worker", [str(out), str(tiny_model), str(tiny_data["train"]), RECIPE], cwd=out.parent)
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_is_finite_and_falls_on_a_fixed_batch(results, strategy):
    losses = results[strategy]["losses"]
    assert all(math.isfinite(x) for x in losses)
    # A frozen random 32-wide base learns slowly: a steady drop of a few hundredths is the signal.
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_and_head_change_and_frozen_base_does_not(results, strategy):
    r = results[strategy]
    changed, unchanged = set(r["changed"]), set(r["unchanged"])
    # lora_A starts random, lora_B at zero: after 5 steps both have moved, and so has the classifier copy.
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any("classifier.modules_to_save" in n for n in changed)
    assert changed <= set(r["trainable"]), f"frozen weights changed: {sorted(changed - set(r['trainable']))}"
    assert any("encoder.layer.0.attention.self.query.base_layer.weight" in n for n in unchanged)
    assert any("word_embeddings" in n for n in unchanged)


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_first_five_losses_agree_across_strategies(results, precision, rel):
    key = "losses" if precision == "fp32" else f"{precision}_losses"
    reference = results["ddp"][key]
    assert len(reference) == 5
    for strategy in STRATEGIES:
        assert results[strategy][key] == pytest.approx(reference, rel=rel), (strategy, results[strategy][key])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # DeepSpeed has no fp16 on CPUs (a GPU-only check)
def test_fp16_with_dynamic_loss_scaling_trains(results, strategy):
    r = results[strategy]
    losses = r["fp16_losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.02, losses
    assert r["losses"][0] == pytest.approx(losses[0], rel=2e-2)  # the same model, rounded to fp16
    # A GradScaler scaled the loss; an overflowing step (fp16 gradients under FSDP's fp16 parameters) is
    # skipped and halves the scale from its initial 2**16, so training goes on instead of diverging.
    scales, stepped = r["fp16_loss_scales"], r["fp16_stepped"]  # scale before step 1 and after each step
    assert len(scales) == 6 and len(stepped) == 5 and scales[0] == 2**16, (scales, stepped)
    assert r["fp16_loss_scale"] == scales[-1]
    # Each step either updates the weights and keeps the scale (it grows only after 2000 good steps), or is
    # skipped: every weight stays as it was, so the next loss on the same batch repeats, and the scale halves.
    for i, took in enumerate(stepped):
        assert scales[i + 1] == (scales[i] if took else scales[i] / 2), (i, scales, stepped)
        assert took or losses[i + 1] == losses[i], (i, losses)
    if strategy == "ddp":  # fp32 weights under fp16 autocast: no gradient overflows at 2**16 on this batch
        assert stepped == [True] * 5 and scales == [2**16] * 6, (scales, stepped)
    else:  # FSDP's fp16 parameters give fp16 gradients: the first step overflows, the rest train at 2**15
        assert stepped == [False, True, True, True, True] and scales == [2**16] + [2**15] * 5, (scales, stepped)
        assert losses[1] == losses[0], losses


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activation_checkpointing_recomputes_the_same_gradients(results, strategy):
    r = results[strategy]
    assert r["block_calls_per_step"] == 1 and r["checkpointing_block_calls_per_step"] == 2, r
    assert r["checkpointing_losses"] == pytest.approx(r["losses"], rel=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_accumulated_halves_train_like_one_whole_batch(results, strategy):
    whole, halves = results[strategy]["losses"], results[strategy]["accum2_losses"]
    assert halves == pytest.approx(whole, rel=1e-4), (whole, halves)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_adversarial_training_on_two_ranks_matches_one_process_accumulating_both_batches(results, kind):
    # Each micro-batch is perturbed along its own gradient: 2 ranks of a batch each train exactly like one process
    # accumulating the two batches, under every strategy that supports it (ZeRO-3 is refused before launch).
    alone = results[kind]["alone"]
    for strategy in [s for s in STRATEGIES if s != "zero3"]:
        assert results[strategy][f"{kind}_losses"] == pytest.approx(alone, rel=1e-4), (strategy, kind)
    # ... and it is not plain training: after the first step (the same clean loss) the losses differ.
    plain = results["ddp"]["losses"]
    assert alone[0] == pytest.approx(plain[0], rel=1e-6)
    assert all(abs(a - p) > 1e-4 for a, p in zip(alone[1:], plain[1:])), (alone, plain)
