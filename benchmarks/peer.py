"""The peer: the same fine-tune done the way users do it today, transformers `Trainer` + peft (+ bitsandbytes for
QLoRA), one process per rank. benchmarks/compare.py launches it beside ours with the same model, data, lengths,
batches, learning rate, LoRA settings and steps:

    deepspeed --num_gpus 2 benchmarks/peer.py lora_cls --zero-stage 2 --out DIR ...   # Trainer's --deepspeed
    torchrun --nproc-per-node 2 benchmarks/peer.py qlora_sft --out DIR ...            # Trainer's own DDP

Each rank writes DIR/peer-rank-N.json: the wall time at the end of its first optimizer step, its samples and
real (non-padding) tokens trained, the seconds after the first step and what it trained in them (the steady state),
its peak memory (RSS; max_memory_allocated on a GPU) and, on rank 0, the final eval metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the prompt template is shared with ours, so both train on the same text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["lora_cls", "qlora_sft"])
    ap.add_argument("--model", required=True, help="a model folder (its tokenizer inside)")
    ap.add_argument("--train", required=True, help="a .jsonl file")
    ap.add_argument("--eval", default="", help="a .jsonl file (empty: no evaluation)")
    ap.add_argument("--rows", type=int, default=0, help="the first N training rows (0: all)")
    ap.add_argument("--eval-rows", type=int, default=0, help="the first N eval rows (0: all)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16, help="examples per rank per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help="0: the epochs decide")
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    ap.add_argument("--zero-stage", type=int, default=-1, help="DeepSpeed ZeRO stage (-1: no DeepSpeed, DDP)")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # DeepSpeed's runner adds it
    return ap.parse_args(argv)


def read_jsonl(path: str, rows: int) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in (lines[:rows] if rows else lines)]


class Counting:
    """A data collator that counts what it collates: examples and real tokens per batch, in order."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.collate(features)
        self.batches.append((len(features), int(batch["attention_mask"].sum())))
        return batch


def lora_cls(args, tokenizer_cls, model_cls):
    """(model, train rows, eval rows, collator, metric of predictions) for SST-2-like text classification."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding

    tok = tokenizer_cls.from_pretrained(args.model)
    train = read_jsonl(args.train, args.rows)
    evaluation = read_jsonl(args.eval, args.eval_rows) if args.eval else []
    labels = sorted({r["label"] for r in train})

    def encode(rows):
        out = []
        for r in rows:
            enc = tok(r["text"], truncation=True, max_length=args.max_length)
            out.append({**enc, "labels": labels.index(r["label"])})
        return out

    model = model_cls.from_pretrained(args.model, num_labels=len(labels))
    model = get_peft_model(model, lora_config(args, LoraConfig, "SEQ_CLS"))

    def metric(pred):
        accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
        return {"accuracy": accuracy}

    return model, encode(train), encode(evaluation), DataCollatorWithPadding(tok), metric


def qlora_sft(args, tokenizer_cls, model_cls):
    """(model, train rows, eval rows, collator, metric) for Alpaca instruction tuning of a 4-bit causal LM: the
    Alpaca prompt, loss on the response only, batches padded to their longest."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, DataCollatorForSeq2Seq

    from launcher.tasks.sft import encode_alpaca

    tok = tokenizer_cls.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(rows):
        out = []
        for r in rows:
            ids, labels = encode_alpaca(tok, r["instruction"], r.get("input"), r["output"])
            ids, labels = ids[: args.max_length], labels[: args.max_length]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        return out

    compute = torch.bfloat16 if args.bf16 else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    model = model_cls.from_pretrained(args.model, quantization_config=quant, dtype=compute)
    model.config.use_cache = False
    # As ours (worker/adapters.py): no repack of the 4-bit weights for bitsandbytes' CPU inference kernel on the
    # first eval forward (it rounds the block scales to bf16, and with peft 0.22 / transformers 5.25 it stops the
    # peer's evaluation: "N must be divisible by block_n").
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    # The QLoRA recipe users copy: norms in fp32, input gradients on; no activation checkpointing (ours has none).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(args, LoraConfig, "CAUSAL_LM"))
    train = encode(read_jsonl(args.train, args.rows))
    evaluation = encode(read_jsonl(args.eval, args.eval_rows)) if args.eval else []
    return model, train, evaluation, DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), None


def lora_config(args, config_cls, task_type: str):
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    return config_cls(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
    )


def zero_config(stage: int) -> dict:
    """DeepSpeed's config as Trainer users write it: "auto" everywhere Trainer fills in."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def peak_memory_mib() -> dict:
    import torch

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    transformers.utils.logging.set_verbosity_error()
    transformers.set_seed(args.seed)
    if args.task == "lora_cls":
        model, train, evaluation, collate, metric = lora_cls(args, AutoTokenizer, AutoModelForSequenceClassification)
    else:
        model, train, evaluation, collate, metric = qlora_sft(args, AutoTokenizer, AutoModelForCausalLM)
    counting = Counting(collate)

    class Clock(TrainerCallback):
        """The wall time at the end of the first optimizer step, and the perf counter then and at the last."""

        first_step_time = first = last = None

        def on_step_end(self, _args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                self.first_step_time, self.first = time.time(), now
            self.last = now

    cuda = torch.cuda.is_available()
    training = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.micro_batch,
        per_device_eval_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        weight_decay=args.weight_decay,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not cuda,
        disable_tqdm=True,
        remove_unused_columns=False,
        deepspeed=zero_config(args.zero_stage) if args.zero_stage >= 0 else None,
    )
    clock = Clock()
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation or None,
        data_collator=counting,
        callbacks=[clock],
    )
    trainer.train()
    # What the steps trained: accelerate's loader collates one batch ahead (to know which is last), so a run that
    # stops at max_steps collated one more than it trained; eval's batches come after.
    trained = counting.batches[: trainer.state.global_step * args.grad_accum]
    first = trained[: args.grad_accum]
    result = {}
    if evaluation:
        if metric is not None:
            result = metric(trainer.predict(evaluation))
        else:
            loss = trainer.evaluate()["eval_loss"]
            result = {"loss": loss, "perplexity": math.exp(loss)}
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "first_step_time": clock.first_step_time,
        "steps": trainer.state.global_step,
        "samples": sum(s for s, _ in trained),
        "tokens": sum(t for _, t in trained),
        "steady_seconds": clock.last - clock.first,
        "steady_samples": sum(s for s, _ in trained) - sum(s for s, _ in first),
        "steady_tokens": sum(t for _, t in trained) - sum(t for _, t in first),
        "metrics": result,
        **peak_memory_mib(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"peer-rank-{rank}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
