"""Recipe authoring: `launcher recipes`, `launcher new`, and every shipped recipe passes validation and a dry run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launcher.data import load_table
from launcher.tasks.metrics import accuracy
from tests.conftest import ROOT, launcher_cli, run

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))


def test_launcher_recipes_lists_each_recipe_with_its_description():
    proc = launcher_cli(["recipes"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "lora_cls" in proc.stdout and "Text classification with LoRA" in proc.stdout
    assert RECIPES and all(name in proc.stdout for name in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_validates_and_dry_runs(recipe, tmp_path):
    out = tmp_path / "run"
    proc = launcher_cli(
        ["run", str(ROOT / "recipes" / f"{recipe}.py"), "--nproc", "2", "--dry-run", f"output_dir={out}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resolved plan" in proc.stdout and proc.stdout.count("--plan") == 2
    assert not out.exists()


def test_new_copies_a_recipe_under_a_new_name_that_runs(tmp_path):
    folder = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", folder)
    proc = launcher_cli(["new", "my_cls", "--from", "lora_cls", "--dir", str(folder)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (folder / "my_cls.py").read_text()
    assert 'recipe: ClassVar[str] = "my_cls"' in text and '"lora_cls"' not in text.split("class Config")[1]
    listed = launcher_cli(["recipes", "--dir", str(folder)], cwd=tmp_path)
    assert "my_cls" in listed.stdout
    dry = launcher_cli(["run", str(folder / "my_cls.py"), "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "runs/my_cls-" in dry.stdout  # the default run directory carries the new name

    again = launcher_cli(["new", "my_cls", "--dir", str(folder)], cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (folder / "my_cls.py").read_text() == text
    missing = launcher_cli(["new", "x", "--from", "nope", "--dir", str(folder)], cwd=tmp_path)
    assert missing.returncode == 2 and "lora_cls" in missing.stderr and not (folder / "x.py").exists()
    bad = launcher_cli(["new", "bad-name", "--dir", str(folder)], cwd=tmp_path)
    assert bad.returncode == 2 and "identifier" in bad.stderr


def test_new_reads_its_source_from_the_shipped_recipes_or_a_named_file_and_writes_only_into_dir(tmp_path):
    """--dir is where the copy goes: --from NAME finds the launcher's own recipe; a .py path is read as given (no
    second .py); a name never walks out of its folder; a Python keyword is no name."""
    elsewhere = tmp_path / "elsewhere"
    proc = launcher_cli(["new", "mine", "--from", "lora_cls", "--dir", str(elsewhere)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'recipe: ClassVar[str] = "mine"' in (elsewhere / "mine.py").read_text()
    proc = launcher_cli(["new", "again", "--from", str(elsewhere / "mine.py"), "--dir", str(elsewhere)], cwd=tmp_path)
    assert proc.returncode == 0 and 'ClassVar[str] = "again"' in (elsewhere / "again.py").read_text(), proc.stderr
    for source, said in [
        ("../../etc/passwd", "give a recipe's name (e.g. lora_cls) or the path of a .py recipe file"),
        (str(tmp_path / "none.py"), "no such file"),
        ("nope", "no recipe of that name"),
    ]:
        proc = launcher_cli(["new", "x", "--from", source, "--dir", str(elsewhere)], cwd=tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "lora_cls" in proc.stderr, "the refusal lists the recipes there are"
    keyword = launcher_cli(["new", "class", "--dir", str(elsewhere)], cwd=tmp_path)
    assert keyword.returncode == 2 and "not a keyword" in keyword.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["again.py", "mine.py"]


def test_report_into_a_file_is_refused_with_exit_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    proc = launcher_cli(["report", str(tmp_path), "--out", str(afile)], cwd=tmp_path)
    assert proc.returncode == 2 and f"--out {afile}: this is a file, not a folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and afile.read_text() == "mine"


def test_the_docs_complete_example_runs(tmp_path, tiny_model):
    """The example in docs/recipes.md, copied as a user would, trains 2 steps and evaluates."""
    text = (ROOT / "docs" / "recipes.md").read_text().split("## A complete small example", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    recipe = tmp_path / "tiny_sentiment.py"
    recipe.write_text(code)
    listed = launcher_cli(["recipes", "--dir", str(tmp_path)], cwd=tmp_path)
    assert "tiny_sentiment" in listed.stdout and "smallest complete recipe" in listed.stdout
    out = tmp_path / "run"
    proc = run(
        [
            "python",
            str(recipe),
            f"model={tiny_model}",
            "train.max_steps=2",
            "train.micro_batch_size=8",
            f"output_dir={out}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["metrics"]) == {"accuracy"}
    # The accuracy is that of the written predictions: every row of the (default) eval file once, its own label.
    eval_source = json.loads((out / "config.json").read_text())["config"]["data"]["eval"]
    truth = load_table(eval_source, "data.eval")["label"]
    preds = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(truth) == 872 and sorted(p["index"] for p in preds) == list(range(len(truth)))
    assert all(set(p) == {"index", "pred", "label"} and p["pred"] in (0, 1) for p in preds)
    assert all(p["label"] == truth[p["index"]] for p in preds)
    pred, label = torch.tensor([p["pred"] for p in preds]), torch.tensor([p["label"] for p in preds])
    assert summary["metrics"]["accuracy"] == accuracy(pred, label)
    assert summary["metrics"]["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in preds) / len(truth))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), sorted(adapter)  # it trained
