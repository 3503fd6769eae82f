"""The data layer: saved-dataset folders, row checks, the tokenization cache and the batch sampler."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from launcher.data import cache as datacache
from launcher.data import check_rows, load_table, take_notes
from launcher.data.sampling import DistributedBatchSampler, global_batches
from launcher.errors import ConfigError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ formats


def test_load_from_disk_folders(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    table.save_to_disk(str(tmp_path / "one"))
    assert load_table(str(tmp_path / "one"), "data.train")["text"][:] == ["a", "b", "c"]

    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "single"))
    assert len(load_table(str(tmp_path / "single"), "data.train")) == 3

    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ConfigError) as e:
        load_table(str(tmp_path / "two"), "data.train")
    assert "splits train, test" in str(e.value) and f"data.train={tmp_path / 'two' / 'train'}" in str(e.value)

    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not one written by datasets' save_to_disk"):
        load_table(str(tmp_path / "plain"), "data.eval")


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".parquet", ".json"])
def test_every_file_format_loads(tmp_path, ext):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]})
    path = tmp_path / f"data{ext}"
    if ext == ".csv":
        table.to_csv(str(path), index=False)
    elif ext == ".tsv":
        table.to_csv(str(path), index=False, sep="\t")
    elif ext == ".parquet":
        table.to_parquet(str(path))
    else:
        path.write_text(json.dumps([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]))
    loaded = load_table(str(path), "data.train")
    assert loaded["text"][:] == ["good", "bad"] and loaded["label"][:] == [1, 0]


# ------------------------------------------------------------------------------------------ row checks


def test_empty_rows_are_counted_and_skipped(tmp_path):
    rows = [{"text": "fine", "label": 1}, {"text": "", "label": 0}, {"text": "ok", "label": None}]
    rows += [{"text": "  ", "label": 1}, {"text": "good", "label": 0}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    table, notes = check_rows(
        load_table(str(path), "data.train"),
        str(path),
        "data.train",
        {"data.text_field": ("text", "text"), "data.label_field": ("label", "label")},
    )
    assert table["text"][:] == ["fine", "good"]
    assert len(notes) == 1 and "skipped 3 of 5 rows" in notes[0] and "(rows 2, 3, 4)" in notes[0]
    assert "data.text_field=text" in notes[0] and "data.label_field=label" in notes[0]


def test_wrong_types_name_the_row_and_setting(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"]}, {"tokens": "a b"}, {"tokens": ["c"]}])
    with pytest.raises(ConfigError) as e:
        check_rows(
            load_table(str(path), "data.train"), str(path), "data.train", {"data.tokens_field": ("tokens", "words")}
        )
    text = str(e.value)
    assert "row 2: data.tokens_field=tokens holds 'a b' (str), expected a list of strings" in text


def test_one_float_among_integer_labels_is_named_at_its_own_row(tmp_path):
    """Arrow reads the whole column as floats because of one 1.5: the error names row 11 and 1.5, not row 1."""
    rows = [{"text": f"t{i}", "label": 1.5 if i == 10 else i % 2} for i in range(20)]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        check_rows(
            load_table(str(path), "data.train"), str(path), "data.train", {"data.label_field": ("label", "label")}
        )
    assert e.value.problems[0] == (
        f"data.train={path} row 11: data.label_field=label holds 1.5 (float), expected an integer or a string"
    )
    assert len(e.value.problems) == 2 and "1 value(s) of the wrong type" in e.value.problems[1]


def test_a_malformed_jsonl_line_is_named_by_its_number(tmp_path, capfd):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(12)]
    lines[6] = '{"text": "x", "label": 1,}'
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line counts as a line
    with pytest.raises(ConfigError) as e:
        load_table(str(path), "data.train")
    assert str(e.value).startswith(f"data.train={path}: line 8 is not valid JSON (Expecting property name"), e.value
    assert "Failed to load JSON" not in capfd.readouterr().err, "datasets' own log line says less: not shown"


def test_every_row_empty_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "", "label": 1}, {"text": None, "label": 0}])
    with pytest.raises(ConfigError, match="every one of its 2 rows has an empty data.text_field=text"):
        check_rows(load_table(str(path), "data.train"), str(path), "data.train", {"data.text_field": ("text", "text")})


# ------------------------------------------------------------------------------------------ cache


def _table(values):
    import datasets

    return datasets.Dataset.from_dict({"x": values})


def test_cache_builds_once_and_reuses(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _table([1, 2, 3]), ["note from the build"]

    first = datacache.cached({"k": 1}, build, str(tmp_path))
    second = datacache.cached({"k": 1}, build, str(tmp_path))
    assert (first.reused, second.reused, len(calls)) == (False, True, 1)
    assert second.table["x"][:] == [1, 2, 3] and second.notes == ["note from the build"]
    third = datacache.cached({"k": 2}, build, str(tmp_path))  # another key: built again
    assert not third.reused and len(calls) == 2
    assert json.loads((Path(first.path) / "key.json").read_text())["key"] == {"k": 1}


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken():
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError):
        datacache.cached({"k": 1}, broken, str(tmp_path))
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []
    assert not datacache.cached({"k": 1}, lambda: (_table([5]), []), str(tmp_path)).reused


def _wait_for(condition, what: str, seconds: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {seconds:.0f}s waiting for {what}")
        time.sleep(0.02)


def _builder(cache_dir: str, folder: str, queue) -> None:
    """Takes the lock and builds; inside build() it says so, then stays there until the waiter has found the lock
    taken, so the two processes provably overlap."""
    import time

    root = Path(folder)

    def build():
        with open(root / "builds", "a") as f:
            f.write("builder\n")
        (root / "building").write_text(str(time.time()))
        _wait_for(lambda: "for another process to finish" in (root / "waiter.err").read_text(), "the waiter")
        (root / "built").write_text(str(time.time()))
        return _table(list(range(10))), []

    try:
        entry = datacache.cached({"k": "race"}, build, cache_dir, poll_seconds=0.05)
        queue.put(("builder", entry.reused, entry.table["x"][:], time.time()))
    except BaseException as e:
        queue.put(("builder", "error", repr(e), time.time()))


def _waiter(cache_dir: str, folder: str, queue) -> None:
    """Asks for the same entry while the builder is inside build(); says (on stderr, every poll) that it waits."""
    import sys
    import time

    root = Path(folder)
    sys.stderr = open(root / "waiter.err", "w", buffering=1)

    def build():
        with open(root / "builds", "a") as f:
            f.write("waiter\n")
        return _table([-1]), []

    try:
        entry = datacache.cached({"k": "race"}, build, cache_dir, poll_seconds=0.05, say_every=0.0)
        queue.put(("waiter", entry.reused, entry.table["x"][:], time.time()))
    except BaseException as e:
        queue.put(("waiter", "error", repr(e), time.time()))


def test_one_process_builds_while_the_other_waits(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    cache_dir = str(tmp_path / "c")
    (tmp_path / "waiter.err").write_text("")
    builder = ctx.Process(target=_builder, args=(cache_dir, str(tmp_path), queue))
    builder.start()
    # The waiter starts only once the builder holds the lock and is inside build().
    _wait_for(lambda: (tmp_path / "building").exists() or not builder.is_alive(), "the builder to start building")
    assert (tmp_path / "building").exists(), "the builder died before building"
    waiter = ctx.Process(target=_waiter, args=(cache_dir, str(tmp_path), queue))
    waiter.start()
    results = {}
    for _ in range(2):
        name, reused, values, finished = queue.get(timeout=180)
        results[name] = (reused, values, finished)
    for p in (builder, waiter):
        p.join(timeout=60)
    assert results["builder"][0] is False and results["waiter"][0] is True, results
    assert (tmp_path / "builds").read_text() == "builder\n"  # exactly one build, by the builder
    # The waiter found the lock taken (it said so while the builder was inside build()) and returned only after
    # the build had ended.
    assert "s for another process to finish tokenized data" in (tmp_path / "waiter.err").read_text()
    assert results["waiter"][2] >= float((tmp_path / "built").read_text()) >= float((tmp_path / "building").read_text())
    assert results["builder"][1] == results["waiter"][1] == list(range(10))
    assert (builder.exitcode, waiter.exitcode) == (0, 0)


def test_fingerprints_follow_content(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    assert datacache.file_digest(str(a)) == datacache.file_digest(str(b))
    _jsonl(b, [{"text": "y"}])
    assert datacache.file_digest(str(a)) != datacache.file_digest(str(b))


def test_recipe_second_run_does_not_retokenize(tmp_path, tiny_model, tiny_data, monkeypatch):
    """lora_cls's build_task twice with the same settings: the second reads the cache and never maps."""
    import datasets
    from transformers import AutoTokenizer

    from launcher.overrides import apply_overrides
    from launcher.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "lora_cls.py"))
    cfg = apply_overrides(
        recipe.Config(),
        [f"data.train={tiny_data['train']}", f"data.eval={tiny_data['test']}", f"data.cache_dir={tmp_path}"],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    maps = []
    real_map = datasets.Dataset.map

    def counting_map(self, *args, **kwargs):
        maps.append(1)
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    take_notes()
    first = recipe.build_task(cfg, tokenizer)
    assert len(maps) == 2 and any("train: tokenized and cached 96 rows" in n for n in take_notes())
    second = recipe.build_task(cfg, tokenizer)
    assert len(maps) == 2, "the second build tokenized again"
    assert any("train: reused 96 rows" in n for n in take_notes())
    assert second.train["input_ids"][:] == first.train["input_ids"][:]
    assert second.lengths == [len(ids) for ids in first.train["input_ids"]]

    cfg.data.max_length = 16  # a setting that changes tokenization: a new entry
    third = recipe.build_task(cfg, tokenizer)
    assert len(maps) == 4 and max(third.lengths) <= 16
    cfg.data.group_by_length = False  # one that does not: reused
    recipe.build_task(cfg, tokenizer)
    assert len(maps) == 4


@pytest.mark.parametrize("name,eval_at", [("lora_cls", 1), ("lora_ner", 1), ("qlora_sft", 2)])
def test_every_recipe_cuts_both_splits_to_max_rows(name, eval_at):
    """data.max_train_rows / data.max_eval_rows are DataConfig settings every recipe honours (its packaged sample);
    `_load` returns (train, ..., eval at `eval_at`, ...)."""
    from launcher.overrides import apply_overrides
    from launcher.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"))
    full = recipe._load(recipe.Config())
    cut = recipe._load(apply_overrides(recipe.Config(), ["data.max_train_rows=7", "data.max_eval_rows=5"]))
    assert len(full[0]) > 7 and len(cut[0]) == 7 and cut[0][0] == full[0][0]
    assert len(full[eval_at]) > 5 and len(cut[eval_at]) == 5 and cut[eval_at][0] == full[eval_at][0]


# ------------------------------------------------------------------------------------------ sampler


def _epoch(n, micro, world, *, seed=0, epoch=0, lengths=None):
    out = []
    for rank in range(world):
        s = DistributedBatchSampler(n, micro, rank=rank, world_size=world, seed=seed, lengths=lengths)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_each_example_once_per_epoch_split_across_ranks():
    ranks = _epoch(48, 4, 3)
    assert all(len(r) == 4 for r in ranks)
    flat = [i for r in ranks for batch in r for i in batch]
    assert sorted(flat) == list(range(48))
    for step in range(4):  # ranks take disjoint slices of the same global batch
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_uneven_data_is_padded_so_every_rank_runs_as_many_steps():
    ranks = _epoch(50, 4, 3)
    assert [len(r) for r in ranks] == [5, 5, 5] and all(len(b) == 4 for r in ranks for b in r)
    flat = [i for r in ranks for batch in r for i in batch]
    assert set(flat) == set(range(50)) and len(flat) == 60


def test_seeded_and_epoch_dependent():
    assert _epoch(40, 4, 2, seed=1) == _epoch(40, 4, 2, seed=1)
    assert _epoch(40, 4, 2, seed=1) != _epoch(40, 4, 2, seed=2)
    assert _epoch(40, 4, 2, seed=1, epoch=0) != _epoch(40, 4, 2, seed=1, epoch=1)


def test_length_grouping_pads_less_and_runs_the_longest_first():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(4000)]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = global_batches(4000, 16, seed=3, epoch=0, lengths=lengths)
    plain = global_batches(4000, 16, seed=3, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(4000))
    assert padded(grouped) < padded(plain) / 5
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    # Still shuffled: batch lengths are not monotonic over the epoch.
    firsts = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_resume_yields_exactly_the_remaining_batches():
    full = DistributedBatchSampler(64, 4, rank=1, world_size=2, seed=7, lengths=list(range(64)))
    full.set_epoch(2)
    batches = list(full)
    state = full.state_dict(batches_done=3)
    resumed = DistributedBatchSampler(64, 4, rank=1, world_size=2, seed=0, lengths=list(range(64)))
    resumed.load_state_dict(state)
    assert list(resumed) == batches[3:]
    resumed.set_epoch(3)  # the next epoch starts from its first batch
    assert len(list(resumed)) == len(batches)


def test_a_resize_keeps_the_examples_of_every_step():
    """2 processes -> 1 (accumulating 2) and 1 -> 2 from the middle of an epoch: every later step trains the
    examples the uninterrupted job's step trains, so no example is skipped or seen twice."""
    from launcher.checkpoints import resumed_batches_done

    def steps(world: int, accum: int, *, skip: int = 0, lengths=None) -> list[list[int]]:
        per_rank = []
        for rank in range(world):
            s = DistributedBatchSampler(
                101, 4, rank=rank, world_size=world, seed=5, lengths=lengths, grad_accum=accum, mark_repeats=True
            )
            s.set_epoch(1)
            s.skip = skip
            micro = list(s)
            per_rank.append([sum(micro[k : k + accum], []) for k in range(0, len(micro), accum)])
        return [sorted(i for r in per_rank for i in r[k]) for k in range(len(per_rank[0]))]

    lengths = [(i * 37) % 50 + 1 for i in range(101)]
    for grouping in (None, lengths):
        two = steps(2, 1, lengths=grouping)
        one = steps(1, 2, lengths=grouping)
        assert one == two and len(two) == 13  # ceil(101 / 8) steps, the last completed by repeats
        assert sorted({i % 101 for s in two for i in s}) == list(range(101))
        # Resumed after 5 steps: rank 0 of the 2-process job had done 5 micro-batches, the 1-process job does 10.
        assert steps(1, 2, skip=resumed_batches_done(5, 1, 2), lengths=grouping) == two[5:]
        assert steps(2, 1, skip=resumed_batches_done(10, 2, 1), lengths=grouping) == one[5:]


def _changed_one_by_one(cfg):
    """(setting, a copy of `cfg` with that one setting changed) for every leaf setting, and for each choice
    (strategy, adapter, optimizer) another of its kinds."""
    import copy
    import dataclasses

    from launcher.config import CHOICES, choice_name

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), ".".join([*path, f.name])
            if f.name in CHOICES and not path:
                other = next(n for n in CHOICES[f.name] if n != choice_name(value))
                yield key, (lambda o, n=f.name, other=other: setattr(o, n, CHOICES[n][other]()))
            elif dataclasses.is_dataclass(value):
                for sub, change in walk(value, [*path, f.name]):
                    yield sub, change
            else:
                new = (
                    (not value) if isinstance(value, bool)
                    else value + 1 if isinstance(value, int)
                    else value * 2 + 0.5 if isinstance(value, float)
                    else [*value, "x"] if isinstance(value, list)
                    else f"{value}-other"
                )  # fmt: skip

                def change(o, path=(*path, f.name), new=new):
                    for part in path[:-1]:
                        o = getattr(o, part)
                    setattr(o, path[-1], new)

                yield key, change

    for key, change in walk(cfg, []):
        other = copy.deepcopy(cfg)
        change(other)
        yield key, other


@pytest.mark.parametrize("name", ["lora_cls", "lora_ner", "qlora_sft"])
def test_only_settings_that_shape_the_rows_change_the_tokenized_cache_key(name):
    """Every setting changed in turn: those of how the run trains, resumes, reports or is watched keep the key (a
    resumed run, another strategy, a watchdog or tracking change reuse the cache); the data, the model and the
    recipe's own tokenizer settings change it."""
    from launcher.data.tokenize import tokenization_settings
    from launcher.recipe import load_recipe
    from launcher.settings import affects

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"))
    cfg = recipe.Config()
    key = tokenization_settings(cfg)
    kept, changed = set(), set()
    for setting, other in _changed_one_by_one(cfg):
        (kept if tokenization_settings(other) == key else changed).add(setting)
    data_rows = {f"data.{k}" for k in key["data"]}
    own = {k for k in key if k not in ("model", "data")}
    assert changed == data_rows | own | {"model"}, changed
    assert {"resume", "overwrite", "watchdog.timeout", "compile", "host_memory", "seed", "output_dir"} <= kept
    assert {s for s in kept if s.startswith(("checkpoint.", "tracking.", "train."))} and "strategy" in kept
    assert {"data.group_by_length", "data.cache", "data.cache_dir", "data.num_workers"} <= kept
    assert {s for s in type(cfg).affects if not affects(s, type(cfg)).rows} <= {s.split(".")[0] for s in kept}
    assert name != "qlora_sft" or {"tokenizer", "tokenizer_vocab"} <= own


def test_a_resumed_run_with_other_reporting_reuses_the_tokenized_rows(tmp_path, tiny_data):
    from transformers import AutoTokenizer

    from launcher.overrides import apply_overrides
    from launcher.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "lora_cls.py"))
    base = [f"data.train={tiny_data['train']}", f"data.eval={tiny_data['test']}", f"data.cache_dir={tmp_path}"]
    tokenizer = AutoTokenizer.from_pretrained(recipe.Config().model_path)
    take_notes()
    recipe.build_task(apply_overrides(recipe.Config(), base), tokenizer)
    assert any("train: tokenized and cached" in n for n in take_notes())
    again = [*base, "resume=auto", "overwrite=true", "checkpoint.every_steps=5", "tracking.report_to=tensorboard",
             "watchdog.timeout=60", "compile=true", "strategy=zero2", f"output_dir={tmp_path / 'b'}"]  # fmt: skip
    recipe.build_task(apply_overrides(recipe.Config(), again), tokenizer)
    assert any("train: reused" in n for n in take_notes())
