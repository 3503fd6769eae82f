"""Every supported cell of the compatibility matrix trains for real: 2 gloo ranks, 2 steps on a repeated batch,
on a tiny Llama-shaped causal LM and on a tiny BERT classifier; the saved model reloads in this plain process
to the logits the trained model gave.

The cells come from `launcher.compat` (the same rules that refuse the others before launch), so adding a rule
or a row changes what runs here. Cells run grouped (one torchrun per strategy family, both models). `make test` runs
a pairwise cover of them (PAIRWISE), `make test-long` the rest: the two tiers together run every cell once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from launcher.choices import Full, Lora8, QLora
from launcher.compat import cells
from tests.conftest import long_unless, run_helper, selected

# The adapters that train tensors of their own beside a frozen base, without changing how the base is stored or
# stepped (adalora, ia3, prompt, prefix), run on a sample of rows: one per way of holding parameters (replicated,
# ZeRO-2's sharded states, ZeRO-3 and FSDP2's sharded parameters, ZeRO-Offload) with its usual optimizer. Their
# tensors are plain trainable parameters, like LoRA's, so the optimizer columns LoRA covers say nothing new for them.
SAMPLED = {"adalora", "ia3", "prompt", "prefix"}
SAMPLE = {
    ("ddp", "adamw"),
    ("zero2", "adamw"),
    ("zero3", "adamw"),
    ("fsdp", "adamw"),
    ("zero2 offload opt", "cpu_adam"),
}
CELLS = [c for c in cells() if c.supported and (c.adapter not in SAMPLED or (c.row, c.optimizer) in SAMPLE)]
if os.environ.get("MATRIX_ADAPTERS"):  # a developer's shortcut: MATRIX_ADAPTERS=ia3,prompt runs those columns only
    CELLS = [c for c in CELLS if c.adapter in os.environ["MATRIX_ADAPTERS"].split(",")]


def _pairs(cell) -> set[tuple[str, ...]]:
    """What a cell exercises together: its strategy (the family: ddp, zero0-3, fsdp) with its adapter and with its
    optimizer, its adapter with its optimizer, and its row (offload and sharding variants) at all."""
    strategy = cell.row.split()[0]
    return {("row", cell.row), (strategy, cell.adapter), (strategy, cell.optimizer), (cell.adapter, cell.optimizer)}


def pairwise_cover(cells) -> list:
    """Cells that exercise every pair the given cells do (_pairs), chosen greedily: each next cell the one that adds
    the most pairs not yet exercised. paged_adamw8bit runs as adamw8bit on CPUs (bitsandbytes pages only CUDA
    memory and says so), so its cells repeat adamw8bit's here and are left to the long tier."""
    pool = [c for c in cells if c.optimizer != "paged_adamw8bit"]
    missing = set().union(*(_pairs(c) for c in pool))
    chosen = []
    while missing:
        best = max(pool, key=lambda c: len(_pairs(c) & missing))
        chosen.append(best)
        missing -= _pairs(best)
    return chosen


PAIRWISE = pairwise_cover(CELLS)
CELL_PARAMS = [long_unless(c in PAIRWISE, c, id=f"{c.row}|{c.adapter}|{c.optimizer}".replace(" ", "")) for c in CELLS]
KINDS = ["llama", "bert"]
NOT_FOR = {("bert", "prefix"): "takes no past key values"}
"""Model kinds an adapter refuses, with the words of the refusal (transformers' BERT takes no past key values)."""
MARKERS = {"ia3": "ia3_l", "prompt": "prompt_encoder", "prefix": "prompt_encoder"}
"""What the name of each of an adapter's trained tensors holds (LoRA's: lora_)."""
FAMILIES = {"ddp": "strategy=ddp", "zero": "strategy=zero", "fsdp": "strategy=fsdp"}


def _key(kind: str, overrides) -> str:
    return f"{kind}: {' '.join(overrides)}"


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory) -> dict[str, dict]:
    """Every cell this session tests (its tier's), on both models."""
    folder = tmp_path_factory.mktemp("matrix")
    chosen = selected(request, "cell")
    results = {}
    for family, prefix in FAMILIES.items():
        cells = [list(c.overrides) for c in chosen if c.overrides[0].startswith(prefix)]
        if not cells:
            continue
        (folder / f"{family}.cells.json").write_text(json.dumps(cells))
        out = folder / family / "results.json"
        out.parent.mkdir(exist_ok=True)
        run_helper("matrix_worker", [str(out), ",".join(KINDS), str(folder / f"{family}.cells.json")], cwd=folder)
        for result in json.loads(out.read_text()):
            results[_key(result["kind"], result["overrides"])] = result
    return results


def _cell_config(overrides):
    from tests.helpers.matrix_worker import cell_config

    return cell_config(list(overrides), "unused", "fp32")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cell", CELL_PARAMS)
def test_cell_trains_and_saves_what_reloads(matrix, kind, cell):
    r = matrix[_key(kind, cell.overrides)]
    if (kind, cell.adapter) in NOT_FOR:
        assert "ConfigError" in r.get("error", "") and NOT_FOR[kind, cell.adapter] in r["error"], r
        return
    assert "error" not in r, r.get("trace", "")
    cfg = _cell_config(cell.overrides)

    losses = r["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    trainable, changed = set(r["trainable"]), set(r["changed"])
    assert r["compared"] >= len(trainable), "the gathered weights miss trained parameters"
    assert trainable - changed == set(), f"trainable parameters that did not move: {sorted(trainable - changed)[:5]}"
    assert changed - trainable == set(), f"frozen weights changed: {sorted(changed - trainable)[:5]}"
    if isinstance(cfg.adapter, Full):
        assert any("embed" in n for n in trainable)
    else:
        marker = MARKERS.get(cell.adapter, "lora_")
        assert trainable and all(marker in n or "modules_to_save" in n for n in trainable), sorted(trainable)[:5]
    if kind == "bert" and not isinstance(cfg.adapter, Full):
        assert any("classifier.modules_to_save" in n for n in changed), "the task head must train under LoRA"

    if "8bit" in cell.optimizer:
        assert r["state_dtypes"] == ["torch.uint8"], r["state_dtypes"]
    else:
        assert r["state_dtypes"] == ["torch.float32"], r["state_dtypes"]

    if isinstance(cfg.adapter, QLora):
        assert r["four_bit"], "no 4-bit layer left"
        for layer in r["four_bit"]:  # two 4-bit values per byte, whatever the storage dtype
            assert layer["bytes"] * 2 == layer["elements"] and layer["quant_state"], layer
    else:
        assert r["four_bit"] == []

    if cell.adapter == "adalora":  # pruned to its budget over the steps, and saved at the ranks kept
        budget = r["adalora"]
        assert budget["total_rank"] <= budget["budget"] < budget["initial"], budget
    reloaded = _reload(kind, cfg, Path(r["saved"]), sum(r["trainable"].values()), r.get("adalora"))
    torch.testing.assert_close(reloaded, torch.tensor(r["logits"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", CELL_PARAMS)
def test_planned_model_state_is_what_a_rank_holds(matrix, cell):
    """The planner's bytes per term (launcher.planning.sizing, from the config.json alone) against what rank 0 of the
    2-rank run held between backward and its optimizer step (holdings: each storage once): within 2%."""
    from launcher.planning.counting import count
    from launcher.planning.sizing import TERMS, model_state
    from tests.helpers.matrix_worker import LLAMA_SHAPE

    r = matrix[_key("llama", cell.overrides)]
    assert "error" not in r, r.get("trace", "")
    planned = model_state(count(LLAMA_SHAPE), _cell_config(cell.overrides), world=2, local_world=2)
    held = {term: sum(r["held"][term].values()) for term in TERMS}
    assert held["params"] > 0 and held["optimizer"] > 0, held
    for term in TERMS:
        assert planned.term(term) == pytest.approx(held[term], rel=0.02), f"{term}: {planned.bytes} planned, {held}"


def _reload(kind: str, cfg, folder: Path, trainable_values: int, adalora: dict | None = None) -> torch.Tensor:
    """The saved model in a plain process (no process group): rebuilt base + adapter, or the full model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tests.helpers.matrix_worker import HEADS, batch_for, build_model

    if isinstance(cfg.adapter, Full):
        auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
        model = auto.from_pretrained(folder)
    else:
        from peft import PeftModel

        from launcher.worker.adapters import quantize

        saved = load_file(folder / "adapter_model.safetensors")
        # Not the empty ZeRO-3 placeholders: every trained value is in the file (AdaLoRA's: those left unpruned).
        if adalora is not None:
            kept = {k.removesuffix(".lora_E"): t.numel() for k, t in saved.items() if k.endswith(".lora_E")}
            assert kept == adalora["ranks"], (kept, adalora["ranks"])
        else:
            assert sum(t.numel() for t in saved.values()) == trainable_values
        base = build_model(kind)
        if isinstance(cfg.adapter, (QLora, Lora8)):
            quantize(base, cfg, HEADS[kind], torch.device("cpu"))
        model = PeftModel.from_pretrained(base, folder)
    model.eval()
    batch = batch_for(kind, 0)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.float()
