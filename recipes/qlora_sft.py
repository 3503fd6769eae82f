"""Instruction tuning of a causal LM (QLoRA by default): Alpaca or chat data, loss on responses only, packing.

Runs unchanged under every launcher; settings are key=value overrides:

    python recipes/qlora_sft.py train.max_steps=20
    launcher run recipes/qlora_sft.py --nproc 2 strategy=zero3 data.train=alpaca/train.jsonl data.eval=alpaca/test.jsonl
    launcher run recipes/qlora_sft.py --nproc 2 model=/models/Llama-3.2-1B adapter=lora data.format=chat

Data: Alpaca rows (`instruction`, optional `input`, `output`) in the Stanford Alpaca prompt, or chat rows
(`messages`: a list of {role: system|user|assistant, content}) in the tokenizer's chat template, or the built-in
one (`<|role|>` lines, see launcher/tasks/sft.py) when it has none. Only response tokens are learnt. With packing,
examples share fixed-length rows; position ids restart per example and the model builds a block-diagonal mask
from them, so no example attends to another. Evaluation: loss and perplexity on the eval set, and greedy
generations from the first eval prompts written to generations.jsonl in the run directory.

With no model or data given it trains a tiny random-weight Llama (tokenizer learnt from the data) on a small
synthetic instruction sample shipped in the package.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

import launcher
from launcher.choices import Adapter, QLora
from launcher.config import DataConfig, Kernels, RunConfig
from launcher.data import note, read_split, tokenize
from launcher.errors import ConfigError
from launcher.settings import OBSERVATION, TRAINING, Affects
from launcher.task import Task


@dataclass(kw_only=True)
class SftData(DataConfig):
    """Instruction data: Alpaca fields or chat messages."""

    train: str = "sample:sft"
    """Training file or saved-dataset folder; defaults to the packaged synthetic sample."""
    eval: str = "sample:sft"
    """Evaluation file (loss, perplexity, generations); empty skips evaluation."""
    format: Literal["auto", "alpaca", "chat"] = "auto"
    """alpaca (instruction/input/output), chat (messages) or auto (chat when the messages field exists)."""
    instruction_field: str = "instruction"
    """Alpaca: column holding the instruction."""
    input_field: str = "input"
    """Alpaca: column holding the optional input (may be absent or empty)."""
    output_field: str = "output"
    """Alpaca: column holding the response."""
    messages_field: str = "messages"
    """Chat: column holding the list of {role, content} turns."""
    max_length: int = 512
    """Tokens per example after truncation, and per packed row."""
    packing: bool = True
    """Pack several examples into each row of max_length tokens (no padding between them)."""
    generations: int = 4
    """Greedy generations from the first N eval prompts, written to generations.jsonl; 0 skips them."""
    max_new_tokens: int = 64
    """Tokens generated per prompt."""


@dataclass(kw_only=True)
class Config(RunConfig):
    """Causal-LM instruction tuning."""

    recipe: ClassVar[str] = "qlora_sft"
    main_metric: ClassVar[str] = "loss"
    affects: ClassVar[dict[str, Affects]] = {"kernels": OBSERVATION, "attention": TRAINING}
    """Own settings that decide how the run trains, not what its tokenized rows hold (the cache ignores them)."""
    model: str = "random:llama-tiny"
    """A causal-LM folder, or random:SHAPE (llama-tiny, qwen2-tiny, llama-3-8b) for random weights."""
    adapter: Adapter = field(default_factory=QLora)
    """What is trained: qlora (4-bit base, the default), lora, dora, lora8 or full."""
    tokenizer: str = "auto"
    """auto: the model's tokenizer (random:SHAPE models: a BPE learnt from the training data); train: always
    learn one from the data; or a tokenizer folder."""
    tokenizer_vocab: int = 8000
    """Vocabulary size of a tokenizer learnt from the data."""
    data: SftData = field(default_factory=SftData)
    """Data files and fields."""
    kernels: Kernels = field(default_factory=Kernels)
    """Fused kernels: kernels.fused_ce=true computes the loss without the whole logits."""
    attention: Literal["auto", "sdpa", "flex", "flash", "eager"] = "auto"
    """The attention kernel: sdpa (PyTorch's), flex (flex_attention: block masks, compiled), flash (flash-attn on
    GPUs, varlen over packed rows) or eager. auto: packed rows on a GPU get flash when flash-attn is installed,
    else flex; everything else sdpa (a packed row under sdpa carries a dense block-diagonal mask)."""

    def model_needs(self) -> dict[str, bool]:
        return {"weights": True, "tokenizer": self.tokenizer == "auto"}


# ------------------------------------------------------------------------------------------ data


def _format(table, d: SftData, path: str) -> str:
    if d.format != "auto":
        return d.format
    if d.messages_field in table.column_names:
        return "chat"
    if d.instruction_field in table.column_names:
        return "alpaca"
    raise ConfigError(
        f"{path} has neither data.messages_field={d.messages_field} (chat) nor "
        f"data.instruction_field={d.instruction_field} (alpaca); its columns are {', '.join(table.column_names)}: "
        f"set data.format and the field names"
    )


def _read(split: str, d: SftData):
    """(a split's valid rows, their format)."""
    from launcher.tasks.sft import ROLES

    setting, path = f"data.{split}", getattr(d, split)

    def fields(table):
        if _format(table, d, path) == "chat":
            return {"data.messages_field": (d.messages_field, "messages")}
        return {"data.instruction_field": (d.instruction_field, "text"), "data.output_field": (d.output_field, "text")}

    table = read_split(d, split, fields)
    kind = _format(table, d, path)
    if kind == "chat":
        bad = []
        for i, turns in enumerate(table[d.messages_field]):
            roles = [t.get("role") for t in turns]
            if any(r not in ROLES for r in roles) or "assistant" not in roles:
                bad.append(f"row {i + 1}: roles {roles}")
        if bad:
            raise ConfigError(
                [f"{setting}={path} {b}" for b in bad[:5]]
                + [f"{setting}={path}: roles must be {', '.join(ROLES)}, with at least one assistant turn per row"]
            )
    return table, kind


def _load(cfg: Config):
    """(train, its format, eval or None, its format)."""
    d = cfg.data
    problems = []
    if d.max_length < 16:
        problems.append(f"data.max_length={d.max_length}: must be at least 16")
    for name in ("generations", "max_new_tokens"):
        if getattr(d, name) < 0:
            problems.append(f"data.{name}={getattr(d, name)}: must be 0 or more")
    if problems:
        raise ConfigError(problems)
    train, kind = _read("train", d)
    evaluation, eval_kind = _read("eval", d) if d.eval else (None, None)
    return train, kind, evaluation, eval_kind


def check(cfg: Config) -> None:
    """Everything about the data and settings that can be wrong, before any worker starts."""
    if cfg.tokenizer not in ("auto", "train") and not os.path.isdir(cfg.tokenizer):
        raise ConfigError(f"tokenizer={cfg.tokenizer}: use auto, train or a tokenizer folder")
    if cfg.tokenizer_vocab < 300:
        raise ConfigError(f"tokenizer_vocab={cfg.tokenizer_vocab}: must be at least 300 (256 bytes and specials)")
    if cfg.adapter.shifts_positions:
        raise ConfigError(
            f"adapter={cfg.adapter.name}: qlora_sft scores and generates from the logits of the input's own "
            "positions, which trained tokens before the input shift; use adapter=prefix (data.packing=false), ia3 "
            "or qlora"
        )
    if cfg.adapter.past_key_values and cfg.data.packing:
        raise ConfigError(
            f"adapter={cfg.adapter.name} with data.packing=true: each packed example would need the prefix of its "
            "own, and a packed row has one; set data.packing=false"
        )
    _load(cfg)
    _some_example_fits(cfg)


def _some_example_fits(cfg: Config) -> None:
    """Whether data.max_length leaves any training example a response token is known once examples are encoded:
    they are encoded here, with the run's tokenizer (a learnt one is cached for the ranks), until one does, so that
    a length that leaves none stops before any rank starts (usually the first example settles it)."""
    from launcher.tasks import sft

    d = cfg.data
    tokenizer = build_tokenizer(cfg)
    train, kind = _read("train", d)
    for row in train:
        ids, labels = sft.truncate(*_encode(tokenizer, row, kind, d), d.max_length)
        if any(x != sft.IGNORE for x in labels[1:]):
            return
    raise ConfigError(f"data.train={d.train}: no row keeps a response within data.max_length={d.max_length}")


def _encode(tokenizer, row: dict, kind: str, d: SftData) -> tuple[list[int], list[int]]:
    """One example's ids and labels (only the response's tokens labelled)."""
    from launcher.tasks import sft

    if kind == "chat":
        return sft.encode_chat(tokenizer, row[d.messages_field])
    return sft.encode_alpaca(tokenizer, row[d.instruction_field], row.get(d.input_field), row[d.output_field])


def _texts(table, kind: str, d: SftData):
    for row in table:
        if kind == "chat":
            yield "\n".join(t["content"] for t in row[d.messages_field])
        else:
            yield "\n".join(str(row.get(f) or "") for f in (d.instruction_field, d.input_field, d.output_field))


def _learns_tokenizer(cfg: Config) -> bool:
    from launcher.models import is_random

    return cfg.tokenizer == "train" or (cfg.tokenizer == "auto" and is_random(cfg.model))


def build_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    from launcher.tasks.vocab import bpe_tokenizer, learnt_tokenizer

    if _learns_tokenizer(cfg):

        def build():
            train, kind = _read("train", cfg.data)
            return bpe_tokenizer(_texts(train, kind, cfg.data), cfg.tokenizer_vocab)

        return learnt_tokenizer(cfg, build)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer if cfg.tokenizer != "auto" else cfg.model_path)
    if tok.pad_token is None:  # Llama-style tokenizers have none; padding is never learnt (label IGNORE)
        tok.pad_token = tok.eos_token
    return tok


def _generation_prompts(rows, kind: str, d: SftData, tokenizer) -> list[dict]:
    """Prompt ids (up to the last assistant turn / the Alpaca response) and the reference answer of `rows`."""
    from launcher.tasks import sft

    prompts = []
    for row in rows:
        if kind == "chat":
            turns = row[d.messages_field]
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            ids, reference = sft.chat_prompt_ids(tokenizer, turns[:last]), turns[last]["content"]
        else:
            ids = sft.alpaca_prompt_ids(tokenizer, row[d.instruction_field], row.get(d.input_field))
            reference = row[d.output_field]
        prompts.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids, "reference": reference})
    return prompts


def build_task(cfg: Config, tokenizer) -> Task:
    from launcher.tasks import sft

    d = cfg.data
    train, kind, evaluation, eval_kind = _load(cfg)

    def encoder(fmt: str):
        def encode(rows):
            out = {"input_ids": [], "labels": []}
            n = len(next(iter(rows.values())))
            for i in range(n):
                ids, labels = _encode(tokenizer, {k: v[i] for k, v in rows.items()}, fmt, d)
                ids, labels = sft.truncate(ids, labels, d.max_length)
                if any(x != sft.IGNORE for x in labels[1:]):  # a response truncated away teaches nothing
                    out["input_ids"].append(ids)
                    out["labels"].append(labels)
            return out

        return encode

    def prepare(table, fmt, split):
        rows = len(table)
        table = tokenize(table, encoder(fmt), cfg, split=split, tokenizer=tokenizer)
        if len(table) < rows:
            note(f"{split}: {rows - len(table)} rows dropped: prompt longer than data.max_length={d.max_length}")
        return table

    train = prepare(train, kind, "train")
    if len(train) == 0:
        raise ConfigError(f"data.train={d.train}: no row keeps a response within data.max_length={d.max_length}")
    lengths = list(train["length"])
    if d.packing:
        groups = sft.pack(lengths, d.max_length)
        ids, labels = train["input_ids"][:], train["labels"][:]
        train = [sft.packed_row([(ids[i], labels[i]) for i in group]) for group in groups]
        lengths = [len(r["input_ids"]) for r in train]
        note(
            f"train: packed {len(ids):,} examples into {len(train):,} rows of up to {d.max_length} tokens "
            f"({100 * sum(lengths) / (len(train) * d.max_length):.0f}% full)"
        )
    prompts = []
    if evaluation is not None:
        prompts = _generation_prompts(
            evaluation.select(range(min(d.generations, len(evaluation)))), eval_kind, d, tokenizer
        )
        evaluation = prepare(evaluation, eval_kind, "eval")

    pad = tokenizer.pad_token_id

    def collate(rows):
        if "position_ids" in rows[0]:
            return sft.collate_packed(rows, pad)
        return sft.collate_padded(rows, pad)

    return Task(
        train=train,
        eval=evaluation,
        collate=collate,
        peft_task_type="CAUSAL_LM",
        # A vocabulary learnt from the data has no trained embeddings anywhere: train them and the output layer
        # in full (with a pretrained model and its own tokenizer they stay frozen, as usual for LoRA).
        heads=["embed_tokens", "lm_head"] if _learns_tokenizer(cfg) else [],
        info={
            "vocab_size": len(tokenizer),
            "pad_token_id": pad,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "prompts": prompts,
            "tokenizer": tokenizer,
        },
        lengths=lengths,
        # Padding is the only pad-id token: packed rows carry no attention mask to count with.
        count_tokens=lambda batch: int((batch["input_ids"] != pad).sum()),
    )


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: Config, task: Task):
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.models import is_random, random_config

    info = task.info
    ids = {k: info[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if is_random(cfg.model):
        config = random_config(cfg.model, vocab_size=info["vocab_size"], **ids)
    else:
        config = AutoConfig.from_pretrained(cfg.model_path)
        if _learns_tokenizer(cfg):  # a vocabulary learnt from the data: its embeddings are new (and trained)
            config.update({"vocab_size": info["vocab_size"], **ids})
    # No KV cache in training: with a cache object present transformers ignores packed position ids.
    config.use_cache = False
    # Built without memory; the launcher fills in the folder's (or random:SHAPE's) weights, each rank only the part
    # its strategy keeps, so a model larger than a rank's memory still loads.
    with launcher.empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=_attention(cfg))
    if cfg.kernels.fused_ce:
        from launcher.kernels.lm_head import fuse_loss

        fuse_loss(model)
    return model


def _attention(cfg: Config) -> str:
    import importlib.util

    from launcher.tasks import sft

    cuda = torch.cuda.is_available()
    flash = importlib.util.find_spec("flash_attn") is not None
    if cfg.attention == "flash" and not (cuda and flash):
        why = "flash-attn is not installed (pip install flash-attn)" if cuda else "flash-attn runs on GPUs only"
        raise ConfigError(f"attention=flash: {why}; use attention=auto")
    return sft.attention_implementation(cfg.attention, packing=cfg.data.packing, cuda=cuda, flash_installed=flash)


# ------------------------------------------------------------------------------------------ metrics


def eval_outputs(outputs, batch) -> dict:
    from launcher.tasks.sft import token_losses

    nll, count = token_losses(outputs.logits, batch["labels"])
    return {"nll": nll, "tokens": count}


def compute_metrics(gathered: dict, task: Task) -> dict[str, float]:
    tokens = gathered["tokens"].sum().item()
    loss = gathered["nll"].double().sum().item() / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def finish(engine, task: Task, cfg: Config, ranks) -> None:
    """Greedy generations from the first eval prompts, on every rank (forwards are collective under sharding);
    rank 0 writes them to generations.jsonl."""
    from launcher.files import write_atomic
    from launcher.tasks.sft import greedy

    prompts = task.info["prompts"]
    if not prompts:
        return
    # Prefix tuning brings past keys and values of its own: generation recomputes the sequence at every token instead.
    cache = not cfg.adapter.trained_positions
    engine.train(False)
    if ranks.is_main:
        print(f"generations: {len(prompts)} prompt(s), {cfg.data.max_new_tokens} new tokens each", flush=True)
    with torch.no_grad():
        ids, eos, pad = [p["ids"] for p in prompts], task.info["eos_token_id"], task.info["pad_token_id"]
        new = greedy(engine.forward, ids, cfg.data.max_new_tokens, eos, pad, engine.device, cache)
    engine.train(True)
    if ranks.is_main:
        decode = task.info["tokenizer"].decode
        lines = [
            json.dumps(
                {"prompt": p["prompt"], "reference": p["reference"], "generated": decode(ids, skip_special_tokens=True)}
            )
            for p, ids in zip(prompts, new)
        ]
        write_atomic(os.path.join(cfg.output_dir, "generations.jsonl"), "\n".join(lines) + "\n")


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()
