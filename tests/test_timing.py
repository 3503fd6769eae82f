"""Time per epoch before launch (planning/timing.py): FLOPs per token from the counted shapes, checked against hand
arithmetic; the training split's tokens from a real run's tokenized cache and from a sample of the raw file; the
epoch's seconds from both and a stated utilisation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launcher.config import RunConfig
from launcher.data.tokens import dataset_tokens
from launcher.overrides import apply_overrides
from launcher.planning.counting import cached_count, planning_config
from launcher.planning.rows import CANDIDATES
from launcher.planning.timing import (
    PEAK_TFLOPS,
    QUANTIZED_FACTOR,
    UTILISATION,
    epoch_seconds,
    flops_per_token,
    utilisation,
)
from tests.conftest import ROOT, SHARED

SAMPLE_TOLERANCE = 0.10
"""A sample of 200 rows scaled by the row count, tokenized with the model's tokenizer, against every row counted."""
CHARS_TOLERANCE = 0.15
"""The same with about 4 characters per token instead of the tokenizer (English text)."""


def _cfg(model: str, *overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(model=model), ["precision=bf16", *overrides])


def _shape(model: str):
    config = planning_config(model)
    return cached_count(config), config


def _tiny_llama_matmul(config: dict) -> int:
    """in x out of every linear of a Llama, by hand: q, o (h x h), k, v (h x kv), gate, up, down, and lm_head."""
    h, i, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * vocab


def test_full_fine_tuning_is_6n_and_a_frozen_base_4n_plus_6x_the_adapter():
    counts, config = _shape("random:llama-tiny")
    n = _tiny_llama_matmul(config)
    full = flops_per_token(counts, config, _cfg("random:llama-tiny", "adapter=full"), seq_len=512)
    assert full["matmul_params"] == n  # lm_head included, the input embedding (a lookup) not
    assert full["matmul"] == 6 * n and full["adapter_params"] == 0
    for adapter in ("lora", "dora", "qlora", "lora8"):
        cfg = _cfg("random:llama-tiny", f"adapter={adapter}", "adapter.r=8")
        frozen = flops_per_token(counts, config, cfg, seq_len=512)
        lora = counts.lora_parameters(8, ["all-linear"])
        assert frozen["adapter_params"] == lora > 0
        assert frozen["matmul"] == 4 * n + 6 * lora, adapter
        assert frozen["attention"] == full["attention"]  # the adapter changes no attention
    assert (
        _cfg("random:llama-tiny", "adapter=qlora").adapter.quantized_base
        and not _cfg("x", "adapter=dora").adapter.quantized_base
    )


def test_a_trained_task_head_adds_its_weight_gradients():
    counts, config = _shape("random:llama-tiny")
    cfg = _cfg("random:llama-tiny", "adapter=lora")
    base = flops_per_token(counts, config, cfg, 128)
    # lm_head is the output embedding, left out of all-linear: named as a head, peft trains a copy of it.
    with_head = flops_per_token(counts, config, cfg, 128, heads=("lm_head",))
    assert with_head["matmul"] - base["matmul"] == 2 * config["hidden_size"] * config["vocab_size"]


def test_llama_3_8b_flops_per_token_by_hand():
    counts, config = _shape("llama-3-8b")
    h, kv, i, layers, vocab = 4096, 1024, 14336, 32, 128256
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * vocab
    assert n == 7_504_658_432  # 6.98B in the blocks, 0.53B in lm_head; the 0.53B input embedding is no matmul
    full = flops_per_token(counts, config, _cfg("llama-3-8b", "adapter=full"), seq_len=2048)
    assert full["matmul_params"] == n
    assert full["matmul"] == 6 * n == pytest.approx(45.03e9, rel=1e-3)
    assert full["attention"] == 12 * layers * h * 2048 == pytest.approx(3.22e9, rel=1e-3)
    assert full["model"] == full["hardware"] == pytest.approx(48.25e9, rel=1e-3)
    lora = flops_per_token(counts, config, _cfg("llama-3-8b", "adapter=lora", "adapter.r=16"), seq_len=2048)
    assert lora["adapter_params"] == 41_943_040  # what peft prints for r=16 on every linear of Llama-3-8B
    assert lora["matmul"] == 4 * n + 6 * 41_943_040 == pytest.approx(30.27e9, rel=1e-3)


def test_attention_grows_linearly_with_the_sequence_and_the_matmuls_do_not():
    counts, config = _shape("random:llama-tiny")
    cfg = _cfg("random:llama-tiny", "adapter=full")
    one, two, four = (flops_per_token(counts, config, cfg, s) for s in (1024, 2048, 4096))
    assert two["attention"] == 2 * one["attention"] and four["attention"] == 4 * one["attention"]
    assert one["matmul"] == two["matmul"] == four["matmul"]
    assert four["model"] - two["model"] == 2 * (two["model"] - one["model"])


def test_activation_checkpointing_adds_the_blocks_forward_as_hardware_flops_only():
    counts, config = _shape("random:llama-tiny")
    h, layers, vocab, seq = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], 1024
    for adapter in ("full", "lora"):
        plain = flops_per_token(counts, config, _cfg("random:llama-tiny", f"adapter={adapter}"), seq)
        cfg = _cfg("random:llama-tiny", f"adapter={adapter}", "activation_checkpointing=true")
        ckpt = flops_per_token(counts, config, cfg, seq)
        assert ckpt["model"] == plain["model"] == plain["hardware"]  # MFU does not count the recomputation
        blocks = plain["matmul_params"] - h * vocab  # lm_head is outside the checkpointed blocks
        assert ckpt["recompute"] == 2 * blocks + 2 * plain["adapter_params"] + 4 * layers * h * seq
        assert ckpt["hardware"] == ckpt["model"] + ckpt["recompute"]


def test_epoch_seconds_is_tokens_times_flops_over_the_machines_share_of_peak():
    flops = {"model": 5e10, "hardware": 6e10, "adapter_params": 0}
    seconds = epoch_seconds(flops, tokens=10**9, world=8, strategy="zero2", quantized=False)
    assert seconds == pytest.approx(1e9 * 6e10 / (8 * PEAK_TFLOPS * 1e12 * UTILISATION["zero2"]))
    assert seconds == pytest.approx(1e9 * 6e10 / (8 * 989e12 * 0.38))  # the stated figures: 19,953 s
    slow = epoch_seconds(flops, tokens=10**9, world=8, strategy="zero2", quantized=True)
    assert slow == pytest.approx(seconds / QUANTIZED_FACTOR)
    assert epoch_seconds(flops, 10**9, 16, "zero2", False) == pytest.approx(seconds / 2)
    assert epoch_seconds(flops, 10**9, 8, "zero2", False, peak_tflops=PEAK_TFLOPS / 2) == pytest.approx(2 * seconds)
    # Optimizer-only offload with a frozen base steps just the adapter on the host: as fast as without offload.
    frozen = {**flops, "adapter_params": 10**6}
    assert epoch_seconds(frozen, 10**9, 8, "zero2+offload", False) == pytest.approx(seconds)
    assert epoch_seconds(flops, 10**9, 8, "zero2+offload", False) > 1.5 * seconds
    with pytest.raises(ValueError, match="known: ddp"):
        epoch_seconds(flops, 10**9, 8, "zero4", False)
    with pytest.raises(ValueError, match="world=0"):
        epoch_seconds(flops, 10**9, 0, "ddp", False)


def test_every_candidate_has_a_utilisation_ordered_by_its_costs():
    assert [name for name, _ in CANDIDATES] == list(UTILISATION)
    assert all(0 < u < 1 for u in UTILISATION.values())
    assert UTILISATION["ddp"] >= UTILISATION["zero2"] >= UTILISATION["zero3"] > UTILISATION["zero2+offload"]
    assert UTILISATION["zero3+offload-all"] == min(UTILISATION.values())
    assert utilisation("fsdp", quantized=True) == pytest.approx(UTILISATION["fsdp"] * QUANTIZED_FACTOR)
    # Parameter offload moves the frozen base over PCIe all the same: no frozen-base shortcut for those rows.
    assert utilisation("fsdp+offload", False, frozen_base=True) == UTILISATION["fsdp+offload"]


# ------------------------------------------------------------------------------------------ dataset tokens


def _sst2_rows(n: int) -> list[dict]:
    lines = (ROOT / "launcher" / "samples" / "sst2" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lora_cls():
    from launcher.recipe import load_recipe

    return load_recipe(str(ROOT / "recipes" / "lora_cls.py"))


def test_tokens_from_a_runs_cache_and_from_a_sample_agree(tmp_path, tiny_model, lora_cls):
    """lora_cls tokenizes a 300-row file as a run does; dataset_tokens then reads the cache it left, and without
    it estimates from the first 200 rows, within SAMPLE_TOLERANCE (CHARS_TOLERANCE without a tokenizer)."""
    from transformers import AutoTokenizer

    train = _write_jsonl(tmp_path / "train.jsonl", _sst2_rows(300))
    args = [f"model={tiny_model}", f"data.train={train}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = apply_overrides(lora_cls.Config(), args)
    before = dataset_tokens(cfg)
    assert before.source == "sample" and before.examples == 300, before
    assert "first 200 of 300 rows" in before.note and "model's tokenizer" in before.note

    task = lora_cls.build_task(cfg, AutoTokenizer.from_pretrained(tiny_model))
    cached = dataset_tokens(cfg)
    assert cached.source == "cache", cached
    assert cached.tokens == sum(task.lengths) and cached.examples == len(task.train) == 300
    assert str(tmp_path / "cache") in cached.note
    assert abs(before.tokens - cached.tokens) <= SAMPLE_TOLERANCE * cached.tokens, (before, cached)

    # Without the cache setting, or with a setting that changes tokenization, the cache is not this run's.
    assert dataset_tokens(apply_overrides(cfg, ["data.cache=false"])).source == "sample"
    cut = dataset_tokens(apply_overrides(cfg, ["data.max_length=8"]))
    assert cut.source == "sample" and cut.tokens == 8 * 300  # every SST-2 row has more than 8 word pieces
    # A model with no tokenizer on disk (random weights learn theirs): about 4 characters per token.
    chars = dataset_tokens(apply_overrides(cfg, ["model=random:llama-tiny"]))
    assert chars.source == "sample" and "characters per token" in chars.note
    assert abs(chars.tokens - cached.tokens) <= CHARS_TOLERANCE * cached.tokens, (chars, cached)


def test_every_data_format_gives_the_same_sample(tmp_path, lora_cls):
    import datasets

    rows = _sst2_rows(250)
    jsonl = _write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "t.csv"), index=False)
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    want = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={jsonl}", "data.eval=", cache]))
    assert want.source == "sample" and want.examples == 250 and want.tokens > 0
    for name in ("t.json", "t.csv", "t.parquet", "saved", "dict"):
        got = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={tmp_path / name}", "data.eval=", cache]))
        assert (got.source, got.examples, got.tokens) == ("sample", 250, want.tokens), (name, got)
    capped = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={jsonl}", "data.max_train_rows=100"]))
    assert capped.examples == 100


def test_the_recipes_text_columns_are_counted_not_its_labels(tmp_path, lora_cls):
    from launcher.recipe import load_recipe

    sft = load_recipe(str(ROOT / "recipes" / "qlora_sft.py"))
    chat = [{"messages": [{"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 40}]}] * 3
    train = _write_jsonl(tmp_path / "chat.jsonl", chat)
    got = dataset_tokens(apply_overrides(sft.Config(), [f"data.train={train}", "data.eval="]))
    # random:llama-tiny learns its tokenizer from the data: 81 characters (the turns' contents and a space) / 4.
    assert (got.source, got.examples, got.tokens) == ("sample", 3, 3 * 21), got
    assert "columns messages" in got.note
    labelled = _write_jsonl(tmp_path / "cls.jsonl", [{"text": "abcd" * 10, "label": "positive" * 10}] * 4)
    cls = dataset_tokens(apply_overrides(lora_cls.Config(), ["model=random:llama-tiny", f"data.train={labelled}"]))
    assert cls.tokens == 4 * 10 and "columns text)" in cls.note  # data.label_field is not text
    cfg = apply_overrides(RunConfig(model="random:llama-tiny"), [f"data.train={labelled}"])
    assert dataset_tokens(cfg).tokens == 4 * 31  # no *_field settings: every column, 40 + 1 + 80 characters / 4


def test_a_missing_or_broken_dataset_is_unknown_with_the_reason(tmp_path, lora_cls):
    missing = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={tmp_path / 'nope.jsonl'}"]))
    assert (missing.source, missing.tokens) == ("unknown", 0) and "nope.jsonl: no such file" in missing.note
    assert "no data.train" in dataset_tokens(RunConfig()).note
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": 1}\n{"text": \n')
    got = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={broken}"]))
    assert got.source == "unknown" and "could not be read (JSONDecodeError" in got.note
    odd = tmp_path / "data.xml"
    odd.write_text("<rows/>")
    unsupported = dataset_tokens(apply_overrides(lora_cls.Config(), [f"data.train={odd}"]))
    assert "unsupported file type '.xml'" in unsupported.note
    bad_sample = dataset_tokens(apply_overrides(lora_cls.Config(), ["data.train=sample:nothing"]))
    assert bad_sample.source == "unknown" and "no such packaged sample" in bad_sample.note


@pytest.mark.skipif(not (SHARED / "sst2").is_dir(), reason="../shared/datasets is absent (a fresh clone)")
def test_the_sample_of_real_sst2_is_within_tolerance_of_every_row_counted(lora_cls):
    """60,614 rows of SST-2: 200 of them, scaled, against all of them tokenized; in well under the plan's seconds."""
    from tokenizers import Tokenizer

    from launcher.models import resolve_model

    path = SHARED / "sst2" / "train.jsonl"
    cfg = apply_overrides(lora_cls.Config(), [f"data.train={path}", "data.eval=", "data.cache=false"])
    start = time.monotonic()
    got = dataset_tokens(cfg)
    seconds = time.monotonic() - start
    assert got.source == "sample" and got.examples == 60_614, got
    assert seconds < 3, f"dataset_tokens took {seconds:.1f} s"
    tok = Tokenizer.from_file(str(Path(resolve_model(cfg.model)) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    every = sum(min(len(e.ids), cfg.data.max_length) for e in tok.encode_batch(texts))  # 806,814
    assert abs(got.tokens - every) <= SAMPLE_TOLERANCE * every, (got.tokens, every)
