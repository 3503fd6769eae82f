"""The slim recipe contract: packaged samples by name, each split read once per process and cut by the data layer,
the tokenization cache key built from the whole configuration, notes collected by the data layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.data import cache as datacache
from launcher.data import files, read_split, source_path, take_notes
from launcher.data.tokenize import cache_key
from launcher.errors import ConfigError
from launcher.job import LaunchEnv
from launcher.overrides import apply_overrides
from launcher.plan import build_plan
from launcher.recipe import Recipe
from tests.conftest import ROOT

TWO = LaunchEnv(world_size=2, local_world_size=2)


def _recipe(name: str) -> Recipe:
    return Recipe.load(str(ROOT / "recipes" / f"{name}.py"))


def test_packaged_samples_are_named_not_pathed():
    assert source_path("sample:sst2", "data.train") == str(ROOT / "launcher" / "samples" / "sst2" / "train.jsonl")
    assert source_path("sample:ner", "data.eval") == str(ROOT / "launcher" / "samples" / "ner" / "test.jsonl")
    assert source_path("/a/b.jsonl", "data.train") == "/a/b.jsonl"
    with pytest.raises(ConfigError, match="data.train=sample:nope: no such packaged sample; samples: sample:ner"):
        source_path("sample:nope", "data.train")
    for name in ("lora_cls", "lora_ner", "qlora_sft"):
        source = (ROOT / "recipes" / f"{name}.py").read_text()
        assert "samples" not in source.replace("sample:", ""), f"{name} still builds a samples path"


def test_a_direct_form_reads_each_split_once_for_the_plan_and_the_task(monkeypatch, tmp_path):
    """`python recipes/lora_cls.py`: build_plan checks the data, then build_task uses it; each file is loaded once."""
    from transformers import AutoTokenizer

    loads = []
    real = files.load_table
    monkeypatch.setattr(files, "load_table", lambda path, setting: loads.append(setting) or real(path, setting))
    monkeypatch.setattr(files, "_READ", {})  # what earlier tests in this process read is not this run's
    recipe = _recipe("lora_cls")
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}" if i % 7 else "", "label": i % 2}) + "\n" for i in range(40)))
    settings = [f"data.train={rows}", "data.max_train_rows=20", "train.micro_batch_size=8"]
    settings.append(f"data.cache_dir={tmp_path}")
    plan = build_plan(recipe, settings, TWO)
    take_notes()
    task = recipe.build_task(plan.config, AutoTokenizer.from_pretrained(plan.config.model_path))
    assert loads == ["data.train", "data.eval"], loads
    assert len(task.train) == 20, "the data layer cut the training split to data.max_train_rows"
    notes = take_notes()
    assert any("skipped 6 of 40 rows with an empty data.text_field=text" in n for n in notes), notes
    assert any(n.startswith("train: tokenized and cached 20 rows") for n in notes), notes
    assert take_notes() == [], "notes are handed over once"


def test_read_split_reads_again_when_the_file_or_the_cut_changes(tmp_path):
    d = _recipe("lora_cls").Config().data
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": i % 2}) + "\n" for i in range(10)))
    d.train = str(path)
    fields = {"data.text_field": ("text", "text"), "data.label_field": ("label", "label")}
    assert len(read_split(d, "train", fields)) == 10
    d.max_train_rows = 4
    assert len(read_split(d, "train", fields)) == 4
    path.write_text("".join(json.dumps({"text": "y", "label": i % 2}) + "\n" for i in range(3)))
    d.max_train_rows = 0
    assert read_split(d, "train", fields)["text"][:] == ["y", "y", "y"]


def test_the_cache_key_covers_every_setting_that_can_shape_the_rows_and_no_other(tmp_path):
    """A recipe passes no key parts: its own settings (outside `data` too) are in the key; training settings not."""
    from transformers import AutoTokenizer

    recipe = _recipe("lora_ner")
    base = recipe.Config()
    tok = AutoTokenizer.from_pretrained(base.model_path)

    def key(*overrides):
        return datacache.fingerprint(cache_key(apply_overrides(base, list(overrides)), "train", 10, tok))

    same = key()
    assert key("train.lr=0.5", "strategy=zero3", "seed=7", "output_dir=x", "data.group_by_length=false") == same
    assert key("data.max_length=64") != same
    assert key("tokenizer=/a/tokenizer") != same, "a recipe-level setting is in the key without the recipe naming it"
    assert key("model_init=config", "head=crf") == same, "the settings the recipe tags as training's are not"
    assert key(f"data.eval={ROOT / 'launcher' / 'samples' / 'ner' / 'train.jsonl'}") != same, "every data file counts"


def test_recipes_read_top_to_bottom_without_infrastructure():
    """What the issue asked to take out of recipes: samples paths, row cuts, hand-made cache keys, notes."""
    import ast

    for name in ("lora_cls", "lora_ner", "qlora_sft"):
        source = Path(ROOT / "recipes" / f"{name}.py").read_text()
        for word in ("first_rows", "data_settings", "code=__file__", "notes=", "resolve_model", "hasattr("):
            assert word not in source, f"{name} still has {word}"
        # Cache keys are the data layer's: a recipe neither imports the cache nor digests files or tokenizers.
        tree = ast.parse(source)
        imported = {
            f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert not {i for i in imported if i.startswith("launcher.data.cache")}, f"{name} imports the cache"
        names = {
            n.attr if isinstance(n, ast.Attribute) else n.id
            for n in ast.walk(tree)
            if isinstance(n, (ast.Name, ast.Attribute))
        }
        assert not {n for n in names if "digest" in n or n in ("cache_key", "cached")}, f"{name} builds a cache key"


def test_a_row_cut_reads_only_the_rows_it_keeps(tmp_path):
    """data.max_train_rows=10 of a large file: rows past the cut are neither type-checked nor kept."""
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(5000)]
    rows[4000]["label"] = [1, 2]  # a wrong type far past the cut
    rows[3] = {"text": "", "label": 0}  # an empty row inside it: skipped, and one more row read instead
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = _recipe("lora_cls").Config().data
    d.train, d.max_train_rows = str(path), 10
    fields = {"data.text_field": ("text", "text"), "data.label_field": ("label", "label")}
    take_notes()
    table = read_split(d, "train", fields)
    assert table["text"][:] == [f"t{i}" for i in range(11) if i != 3]
    assert take_notes() == [
        f"data.train={path}: skipped 1 of the first 1024 (of 5000) rows with an empty data.text_field=text, "
        "data.label_field=label (rows 4)"
    ]
    d.max_train_rows = 0
    with pytest.raises(ConfigError, match="row 4001: data.label_field=label holds"):
        read_split(d, "train", fields)
