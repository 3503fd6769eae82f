"""What a run trains: each adapter's settings, its own checks, what it is (capabilities the rest of the launcher
asks, never its name) and the tensors it trains beside the base (`trained_tensors`, what the planner sizes). How
each is applied lives in launcher/worker/adapters.py. Pure: no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Shaped = tuple[str, tuple[int, ...], str]
"""(parameter name, shape, role): role "trained", or "frozen" for a tensor the adapter adds but does not train."""


def lora_tensors(in_features: int, out_features: int, r: int, dora: bool = False) -> dict[str, tuple[int, ...]]:
    """peft's trained tensors on one LoRA target, by name under it: A (r x in), B (out x r), and DoRA's magnitude
    (out). The one statement of LoRA's size: the planner's memory and FLOPs and the tests against peft use it."""
    shapes = {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}
    if dora:
        shapes["lora_magnitude_vector"] = (out_features,)
    return shapes


@dataclass(kw_only=True)
class AdapterChoice:
    """What every adapter answers."""

    name: ClassVar[str]
    quantized_base: ClassVar[bool] = False
    """The frozen base is quantized by bitsandbytes (it computes where it is held: never offloaded)."""
    shardable_base: ClassVar[bool] = True
    """ZeRO-3 and FSDP2 can shard its base."""
    needs_whole_adapter: ClassVar[bool] = False
    """It reads its trained tensors and their gradients whole after every step (no strategy that shards them)."""
    shifts_positions: ClassVar[bool] = False
    """It puts trained positions before the input, so the input's own positions move."""
    past_key_values: ClassVar[bool] = False
    """Its trained positions are keys and values before every attention layer's (one set per row; the model's
    KV cache carries them)."""
    trains_base: ClassVar[bool] = False
    """Every parameter of the model is trained (nothing is added beside it)."""
    base_role: ClassVar[str] = "frozen"
    """How the planner stores a base linear layer's weight: frozen, nf4 (packed 4-bit) or int8."""

    @property
    def trained_positions(self) -> bool:
        """It adds trained positions instead of changing layers: nothing to merge into the weights."""
        return self.shifts_positions or self.past_key_values

    def problems(self) -> list[str]:
        """Its own settings' problems, each naming the setting, the value and the fix."""
        return []

    def trained_tensors(self, counts: Any) -> list[Shaped]:
        """The tensors it adds beside the base, with peft's names and shapes, from the model's parameter counts
        (planning.counting.Counts): what the planner sizes."""
        return []


@dataclass(kw_only=True)
class Lora(AdapterChoice):
    """LoRA through peft: low-rank updates on the target modules; the base model stays frozen."""

    name: ClassVar[str] = "lora"
    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input path."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Names (suffixes) of the linear modules that get LoRA updates, comma-separated, or all-linear (every linear
    layer but the task head and the output embedding)."""

    trains_magnitude: ClassVar[bool] = False
    """DoRA's trained magnitude vector beside A and B."""

    def trained_tensors(self, counts: Any) -> list[Shaped]:
        # Target by target, in module order: the order a strategy lays them out in (ZeRO's flat buffers).
        return [t for lin in counts.targets(self.target_modules) for t in self.on_target(lin)]

    def on_target(self, lin: Any) -> list[Shaped]:
        """Its tensors beside one target linear layer (planning.counting.Linear)."""
        shapes = lora_tensors(lin.in_features, lin.out_features, self.r, self.trains_magnitude)
        return [(f"{lin.name}.{name}", shape, "trained") for name, shape in shapes.items()]

    def problems(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"adapter.r={self.r}: the LoRA rank must be at least 1, e.g. adapter.r=16")
        if not self.target_modules:
            problems.append("adapter.target_modules is empty: name modules, e.g. adapter.target_modules=query,value")
        return problems


@dataclass(kw_only=True)
class Dora(Lora):
    """DoRA through peft: LoRA on the direction of each weight plus a trained magnitude vector."""

    name: ClassVar[str] = "dora"
    trains_magnitude: ClassVar[bool] = True


@dataclass(kw_only=True)
class QLora(Lora):
    """QLoRA: LoRA on a base model quantized to 4 bits by bitsandbytes (the base stays frozen and 4-bit)."""

    name: ClassVar[str] = "qlora"
    quantized_base: ClassVar[bool] = True
    base_role: ClassVar[str] = "nf4"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per weight)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype the 4-bit weights are dequantized to for matmuls; auto follows precision."""
    quant_storage: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = "auto"
    """Dtype the packed 4-bit weights are stored as. ZeRO-3 and FSDP2 shard them like the other parameters, so
    they need the dtype the strategy keeps parameters in; auto picks uint8 when nothing shards parameters, else the
    precision's dtype."""


@dataclass(kw_only=True)
class Lora8(Lora):
    """LoRA on a base model quantized to 8 bits by bitsandbytes (LLM.int8)."""

    name: ClassVar[str] = "lora8"
    quantized_base: ClassVar[bool] = True
    shardable_base: ClassVar[bool] = False  # Int8Params with their per-row scales
    base_role: ClassVar[str] = "int8"
    threshold: float = 6.0
    """Outlier threshold of LLM.int8: activations above it are multiplied in 16 bits."""


@dataclass(kw_only=True)
class AdaLora(Lora):
    """AdaLoRA through peft: LoRA in SVD form (A, a singular-value vector E, B) whose rank budget shrinks from r to
    target_r per layer on average, the least important singular values of the whole model pruned on a cubic schedule
    (AdaLoRA's update_and_allocate after every optimizer step). The budget scores each value by its gradient, so the
    strategy must hold the adapter's tensors whole: DDP and ZeRO 0-2, not ZeRO-3 or FSDP2."""

    name: ClassVar[str] = "adalora"
    needs_whole_adapter: ClassVar[bool] = True
    r: int = 12
    """Initial rank of every target module (peft's init_r)."""
    target_r: int = 8
    """Average rank per target module once the budget is spent: the whole model keeps target_r x targets values."""
    tinit: int = 0
    """Optimizer steps at the start before any pruning (the budget stays r x targets)."""
    tfinal: int = 0
    """Optimizer steps at the end with the final ranks fixed (the budget reaches target_r before them)."""
    delta_t: int = 1
    """Steps between two reallocations of the budget."""
    beta1: float = 0.85
    """Smoothing of the importance (sensitivity) scores, an exponential moving average."""
    beta2: float = 0.85
    """Smoothing of their uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the loss term that keeps A's rows and B's columns orthogonal (an SVD's)."""

    def on_target(self, lin: Any) -> list[Shaped]:
        """LoRA's, then the singular values and the rank the update is divided by."""
        extra = [(f"{lin.name}.lora_E", (self.r, 1), "trained"), (f"{lin.name}.ranknum", (1,), "frozen")]
        return super().on_target(lin) + extra

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 1 <= self.target_r <= self.r:
            problems.append(
                f"adapter.target_r={self.target_r}: the final average rank must be between 1 and adapter.r={self.r}, "
                f"e.g. adapter.target_r={max(1, self.r * 2 // 3)}"
            )
        if self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            bad = "delta_t" if self.delta_t < 1 else "tinit" if self.tinit < 0 else "tfinal"
            problems.append(f"adapter.{bad}={getattr(self, bad)}: steps, at least {int(bad == 'delta_t')}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"adapter.{name}={getattr(self, name)}: a moving-average factor in [0, 1), e.g. 0.85")
        if self.orth_reg_weight < 0:
            problems.append(f"adapter.orth_reg_weight={self.orth_reg_weight}: must be 0 or more (0 disables it)")
        return problems


@dataclass(kw_only=True)
class Full(AdapterChoice):
    """Full fine-tuning: every parameter is trained."""

    name: ClassVar[str] = "full"
    trains_base: ClassVar[bool] = True


@dataclass(kw_only=True)
class Ia3(AdapterChoice):
    """IA3 through peft: trained vectors that rescale the keys, values and feed-forward activations of the frozen
    base (about a hundredth of LoRA's parameters)."""

    name: ClassVar[str] = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Linear modules (leaf names) whose outputs are rescaled, or whose inputs for feedforward_modules; auto: peft's
    choice for the model type (BERT key, value, output.dense; Llama k_proj, v_proj, down_proj)."""
    feedforward_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Which of target_modules are feed-forward layers (their input is rescaled); auto: peft's choice."""

    def problems(self) -> list[str]:
        if not self.target_modules:
            return ["adapter.target_modules is empty: name modules, e.g. adapter.target_modules=auto"]
        return []

    def trained_tensors(self, counts: Any) -> list[Shaped]:
        """A vector per layer: over the output, or over the input of a feed-forward one."""
        return [
            (f"{lin.name}.ia3_l", (1, lin.in_features) if ff else (lin.out_features, 1), "trained")
            for lin, ff in counts.ia3_targets(self.target_modules, self.feedforward_modules)
        ]


@dataclass(kw_only=True)
class PromptTuning(AdapterChoice):
    """Prompt tuning through peft: num_virtual_tokens trained embeddings put before every input; the whole model
    stays frozen (a classifier's head trains too)."""

    name: ClassVar[str] = "prompt"
    shifts_positions: ClassVar[bool] = True
    num_virtual_tokens: int = 20
    """Trained embeddings prepended to each sequence."""

    def problems(self) -> list[str]:
        return _virtual_token_problems(self.num_virtual_tokens)

    def trained_tensors(self, counts: Any) -> list[Shaped]:
        return [("prompt_encoder.embedding.weight", (self.num_virtual_tokens, counts.hidden_size), "trained")]


@dataclass(kw_only=True)
class PrefixTuning(AdapterChoice):
    """Prefix tuning through peft: num_virtual_tokens trained keys and values before the sequence in every attention
    layer (causal LMs: transformers' encoders such as BERT take no past key values to carry them)."""

    name: ClassVar[str] = "prefix"
    past_key_values: ClassVar[bool] = True
    num_virtual_tokens: int = 20
    """Trained key/value positions per layer."""
    projection: bool = False
    """Reparametrize the prefixes through a two-layer MLP of the model's width (prefix_projection; more trained
    parameters, often steadier)."""

    def problems(self) -> list[str]:
        return _virtual_token_problems(self.num_virtual_tokens)

    def trained_tensors(self, counts: Any) -> list[Shaped]:
        """Keys and values of every layer, or an MLP producing them (`projection`)."""
        d = counts.kv_size  # peft's token width for prefixes: a key's (GQA: the key/value heads' width)
        kv = counts.num_layers * 2 * d
        n = self.num_virtual_tokens
        if not self.projection:
            return [("prompt_encoder.embedding.weight", (n, kv), "trained")]
        return [
            ("prompt_encoder.embedding.weight", (n, d), "trained"),
            ("prompt_encoder.transform.0.weight", (d, d), "trained"),
            ("prompt_encoder.transform.0.bias", (d,), "trained"),
            ("prompt_encoder.transform.2.weight", (kv, d), "trained"),
            ("prompt_encoder.transform.2.bias", (kv,), "trained"),
        ]


def _virtual_token_problems(n: int) -> list[str]:
    if n < 1:
        return [f"adapter.num_virtual_tokens={n}: train at least 1, e.g. adapter.num_virtual_tokens=20"]
    return []


Adapter = Lora | Dora | QLora | Lora8 | AdaLora | Full | Ia3 | PromptTuning | PrefixTuning

ADAPTERS: dict[str, object] = {
    "full": Full,
    "lora": Lora,
    "dora": Dora,
    "qlora": QLora,
    "lora8": Lora8,
    "adalora": AdaLora,
    "ia3": Ia3,
    "prompt": PromptTuning,
    "prefix": PrefixTuning,
}
