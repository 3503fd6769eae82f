"""The choices that select a family of settings by name (`strategy=zero3`, `adapter=qlora`, `optimizer=adamw8bit`):
each type carries its settings, its checks and its capabilities, next to one another (strategies, adapters,
optimizers). launcher.config holds the sections every run has and the RunConfig that combines them."""

from launcher.choices.adapters import (
    ADAPTERS,
    AdaLora,
    Adapter,
    AdapterChoice,
    Dora,
    Full,
    Ia3,
    Lora,
    Lora8,
    PrefixTuning,
    PromptTuning,
    QLora,
)
from launcher.choices.optimizers import (
    OPTIMIZERS,
    AdamW,
    AdamW8bit,
    CpuAdam,
    Optimizer,
    OptimizerChoice,
    PagedAdamW8bit,
)
from launcher.choices.strategies import STRATEGIES, Auto, Ddp, Fsdp, Strategy, StrategyChoice, Zero

__all__ = [
    "ADAPTERS", "OPTIMIZERS", "STRATEGIES", "AdaLora", "AdamW", "AdamW8bit", "Adapter", "AdapterChoice", "Auto",
    "CpuAdam", "Ddp", "Dora", "Fsdp", "Full", "Ia3", "Lora", "Lora8", "Optimizer", "OptimizerChoice",
    "PagedAdamW8bit", "PrefixTuning", "PromptTuning", "QLora", "Strategy", "StrategyChoice", "Zero",
]  # fmt: skip
