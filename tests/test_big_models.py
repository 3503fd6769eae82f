"""Models built on the meta device and loaded by their strategy, each rank only the part it keeps.

One torchrun of 2 gloo ranks loads a random-weight Llama folder (written by scripts/write_random_model.py) under
each strategy and adapter (tests/helpers/load_worker.py); one more at 1 rank and 2 ranks builds random:llama-tiny,
to compare the initial weights across world sizes.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, run, run_helper, slow_bf16, why_failed

CASES = [
    "fsdp:qlora:fp32",
    "fsdp:lora:fp32",
    "zero3:qlora:fp32",
    "zero3:lora:fp32",
    "zero3:full:fp32",
    "ddp:lora:fp32",
    "zero2:full:fp32",
    "fsdp:lora:bf16",
]
RANDOM_CASES = ["fsdp:full:fp32", "zero3:full:fp32"]


def launch(out, model: str, cases: list[str], nproc: int) -> dict:
    run_helper("load_worker", [str(out), model, *cases], cwd=out.parent, nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from launcher.random_folder import write_random_folder

    path = tmp_path_factory.mktemp("models") / "llama-tiny"
    # fp32 on disk, so a load in fp32 is exact; small shards, so a model spans several files.
    write_random_folder("llama-tiny", str(path), dtype="fp32", seed=3, shard_mb=2, vocab_size=1000)
    return path


@pytest.fixture(scope="module")
def loaded(folder, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("load") / "out.json", str(folder), CASES, 2)


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_is_materialized_and_equals_the_folder(loaded, case):
    r = loaded[case]
    assert r["still_meta"] == 0
    assert r["weights_checked"] >= 3, r  # embeddings, norms, lm_head at least (linear layers too unless quantized)
    tolerance = 0.0 if case.endswith("fp32") else 4e-3  # a bf16 frozen base holds the folder's values rounded
    assert r["max_weight_diff"] <= tolerance, r["max_weight_diff"]


@pytest.mark.parametrize("case", [c for c in CASES if ":qlora:" in c])
def test_each_layer_is_quantized_by_one_rank_and_sent_to_the_other(loaded, case):
    r = loaded[case]
    counts, layers = r["quantized_per_rank"], r["four_bit_layers"]
    assert layers > 0 and sum(counts) == layers and max(counts) - min(counts) <= 1, (counts, layers)


@pytest.mark.parametrize("case", CASES)
def test_first_loss_equals_a_plain_single_process_load(loaded, case):
    r = loaded[case]
    if ":qlora:" in case:
        # Quantized from the same values as a plain load quantized the old way; near the unquantized loss.
        assert r["first_loss"] == pytest.approx(r["plain_quantized_loss"], abs=1e-4)
        assert r["first_loss"] == pytest.approx(r["plain_loss"], abs=2e-2)
    elif case.endswith("bf16"):
        assert r["first_loss"] == pytest.approx(r["plain_loss"], abs=2e-2)
    else:
        assert r["first_loss"] == pytest.approx(r["plain_loss"], abs=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_trains_and_saves_every_trainable_element(loaded, case):
    r = loaded[case]
    losses = r["train_losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0], losses
    assert r["saved_trainable_elements"] == r["trainable_numel"] > 0


def test_random_shape_gives_the_same_initial_weights_at_1_and_2_ranks(tmp_path_factory):
    one = launch(tmp_path_factory.mktemp("init1") / "out.json", "random:llama-tiny", RANDOM_CASES, 1)
    two = launch(tmp_path_factory.mktemp("init2") / "out.json", "random:llama-tiny", RANDOM_CASES, 2)
    for case in RANDOM_CASES:
        assert one[case]["compared"] > 20
        assert one[case]["hashes"] == two[case]["hashes"], case
        # ...and they are the very values a folder written with the same seed holds (one generator per tensor).
        assert one[case]["seeded_values_match"] and two[case]["seeded_values_match"]
    assert one["fsdp:full:fp32"]["hashes"] == one["zero3:full:fp32"]["hashes"]


# ------------------------------------------------------------------------------------ a ~1B model, measured

# The ~1B Llama shape (llama-3.2-1b's layers with a 1,000-token vocabulary: 0.97B parameters, 3.9 GB in fp32), each
# case a real `launcher run` of 2 ranks: loads, trains 2 steps (the second with the optimizer's states), saves.
GENERATES = "fsdp qlora"
"""The case that runs the recipe's end-of-run generations (data.generations=4, 64 new tokens each)."""
BIG_CASES = {
    "fsdp qlora": ["strategy=fsdp", "adapter=qlora", "precision=fp32"],
    "zero3 qlora": ["strategy=zero3", "adapter=qlora", "precision=fp32"],
    # A bf16 frozen base: half the bytes of fp32 (these CPUs emulate bf16 compute: slow, but two steps).
    "fsdp lora": ["strategy=fsdp", "adapter=lora", "precision=bf16"],
    "zero3 lora": ["strategy=zero3", "adapter=lora", "precision=bf16"],
    # Every parameter trained: bf16 weights, DeepSpeed's fp32 master copy and gradients, 8-bit AdamW states, each
    # partitioned over the 2 ranks; the model saved streamed (one tensor gathered at a time, shard by shard).
    "zero3 full": ["strategy=zero3", "adapter=full", "precision=bf16", "optimizer=adamw8bit"],
}


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    from launcher.random_folder import write_random_folder

    path = tmp_path_factory.mktemp("big") / "llama-1b"
    write_random_folder("llama-3.2-1b", str(path), dtype="bf16", seed=0, shard_mb=500, vocab_size=1000)
    return path


@pytest.fixture(scope="module")
def big_runs(big_folder, tmp_path_factory):
    out = {}
    for case, settings in BIG_CASES.items():
        if "precision=bf16" in settings and slow_bf16():
            out[case] = {"skipped": slow_bf16()}
            continue
        run_dir = tmp_path_factory.mktemp("big-run") / "run"
        proc = run(
            [
                "launcher",
                "run",
                str(ROOT / "recipes/qlora_sft.py"),
                "--nproc",
                "2",
                f"model={big_folder}",
                *settings,
                "activation_checkpointing=true",
                "data.max_train_rows=16",
                "data.max_length=128",
                "data.packing=false",
                # One case evaluates and generates as the recipe does by default (greedy generations under FSDP2,
                # as many forwards as tokens); the others train and save only.
                *(["data.max_eval_rows=8"] if case == GENERATES else ["data.eval="]),
                "train.micro_batch_size=1",
                "train.max_steps=2",
                "train.log_every=1",
                f"output_dir={run_dir}",
            ],
            cwd=run_dir.parent,
            timeout=900,
        )
        assert proc.returncode == 0, case + "\n" + why_failed(proc)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r["split"] == "train"]
        out[case] = {"summary": summary, "losses": losses, "dir": run_dir}
    return out


def _big_run(big_runs: dict, case: str) -> dict:
    if "skipped" in big_runs[case]:
        pytest.skip(big_runs[case]["skipped"])
    return big_runs[case]


def _fp32_mib(folder) -> float:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return 2 * index["metadata"]["total_size"] / 2**20  # the folder is bf16: fp32 is twice its bytes


@pytest.mark.long
@pytest.mark.parametrize("case", list(BIG_CASES))
def test_a_1b_model_loads_into_each_rank_part_trains_and_saves(big_runs, big_folder, case):
    from safetensors.torch import load_file

    r = _big_run(big_runs, case)
    s, fp32 = r["summary"], _fp32_mib(big_folder)
    assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
    per_rank = ("peak_rss_mib_per_rank", "rss_mib_before_model_per_rank", "peak_rss_mib_loaded_per_rank")
    assert [len(s[k]) for k in per_rank] == [2, 2, 2], s  # the bounds below are checked on both ranks
    assert s["host_memory"] == "lean"  # host_memory=auto at 1B parameters: the bounds below depend on it
    if "full" in case:
        index = json.loads((r["dir"] / "model" / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) >= 2  # streamed: shard by shard, not one gathered state dict
        saved = sum(t.numel() for f in files for t in load_file(str(r["dir"] / "model" / f)).values())
        assert saved == s["trainable_parameters"] > 0.9e9
        # Not 40%: the run needs its state (DeepSpeed's fp32 master copy and gradients alone are 50% each per
        # rank), and its engine makes them while it wraps the model. Measured 180% per rank (6.7 GB); before the
        # step was cut into sub-groups it was OOM-killed at 12 GB (330%), before the streamed save it peaked at 240%.
        for peak in s["peak_rss_mib_per_rank"]:
            assert peak < 2.0 * fp32, (case, peak, fp32)
        return
    saved = load_file(str(r["dir"] / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == s["trainable_parameters"] > 0
    if case == GENERATES:  # the recipe's defaults: 4 prompts, their generations written after the adapter
        lines = (r["dir"] / "generations.jsonl").read_text().splitlines()
        assert len(lines) == 4 and all(json.loads(line)["prompt"] for line in lines)
    # What loading added on each rank (measured: peak RSS once the model is wrapped, minus RSS before it was built)
    # stays below 40% of one fp32 copy: a rank's bf16 shard is 25%, a whole bf16 copy would be 50%, a whole fp32
    # copy 100% (measured: fsdp/zero3 qlora 825, fsdp lora 1090, zero3 lora 1210 of 3730 MiB).
    for before, loaded in zip(s["rss_mib_before_model_per_rank"], s["peak_rss_mib_loaded_per_rank"]):
        assert loaded - before < 0.40 * fp32, (case, before, loaded, fp32)


@pytest.mark.long
@pytest.mark.parametrize(
    "case, bound",
    [
        # The whole run (process, data, loading, a step, save), measured per rank. QLoRA: a rank's 4-bit part plus
        # one block in use (measured 29% under fsdp, 31% under zero3 with one step, 33% and 34% with two; zero3 was
        # 59% while bitsandbytes kept every gathered 4-bit weight alive until backward, 2274 MiB).
        ("fsdp qlora", 0.40),
        ("zero3 qlora", 0.40),
        # LoRA over a bf16 base: the rank's bf16 shard alone is 25% and the process (python, torch, data) 11%, so
        # 40% leaves no room for a block and the step; measured 52% fsdp, 49% zero3 (53% both with two steps; zero3
        # was 108% with DeepSpeed's default of 1e9 live parameters: the whole model stayed gathered).
        ("fsdp lora", 0.60),
        ("zero3 lora", 0.60),
    ],
)
def test_a_1b_run_peaks_per_rank_within_its_bound_of_the_fp32_model(big_runs, big_folder, case, bound):
    fp32 = _fp32_mib(big_folder)
    peaks = _big_run(big_runs, case)["summary"]["peak_rss_mib_per_rank"]
    assert len(peaks) == 2, peaks
    for peak in peaks:
        assert peak < bound * fp32, (case, peak, fp32)


@pytest.mark.long
@pytest.mark.parametrize("case", list(BIG_CASES))
def test_a_1b_run_holds_the_model_state_the_plan_says(big_runs, big_folder, case):
    """What each rank held of its model state (summary.json, measured on its step) against `launcher plan`'s figure
    for the same run (its own resolved config, the folder's config.json, 2 CPU ranks): each term within 2%, the
    optimizer's states (made by the first step) measured on the second."""
    from launcher.plan import read_plan
    from launcher.planning.counting import cached_count, planning_config
    from launcher.planning.rows import Machine, plan_row
    from launcher.planning.sizing import TERMS
    from launcher.recipe import Recipe

    run_dir = _big_run(big_runs, case)["dir"]
    cfg = read_plan(str(run_dir / "config.json"), Recipe.load(str(ROOT / "recipes/qlora_sft.py"))).config
    config = planning_config(str(big_folder))
    planned = plan_row("run", [], cfg, cached_count(config), config, Machine(1, 2), 128, gpu=False).state
    held_per_rank = _big_run(big_runs, case)["summary"]["model_state_bytes_per_rank"]
    assert len(held_per_rank) == 2 and all(held_per_rank), held_per_rank
    for rank, held in enumerate(held_per_rank):
        for term in TERMS:
            measured, expected = sum(held[term].values()), planned.term(term)
            assert measured == pytest.approx(expected, rel=0.02), (case, rank, term, measured, expected)
