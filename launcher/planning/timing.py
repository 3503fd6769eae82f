"""How long an epoch takes, planned before launch (`launcher plan`). Pure: no torch, no model built, no weights.

Three figures multiply out to a time: the training FLOPs of one token (`flops_per_token`, from the parameter counts
of planning.counting), the tokens of the training split (launcher.data.tokens: counted from the tokenized cache a run
left, else estimated from a sample of the raw file), and a stated share of the GPU's peak each strategy reaches
(`UTILISATION`, assumptions, not measurements):

    epoch_seconds = tokens * hardware FLOPs per token / (world * PEAK_TFLOPS * 1e12 * utilisation)
"""

from __future__ import annotations

import re

from launcher.choices import Full, Lora, PromptTuning
from launcher.config import RunConfig
from launcher.planning.counting import Counts, Linear, within

PEAK_TFLOPS = 989.0
"""H100 SXM, dense bf16 tensor cores (NVIDIA's datasheet: 1,979 with 2:4 sparsity, half that dense)."""

UTILISATION: dict[str, float] = {
    "ddp": 0.40,
    "zero1": 0.40,
    "zero2": 0.38,
    "fsdp": 0.35,
    "zero3": 0.35,
    "zero2+offload": 0.20,
    "zero3+offload": 0.15,
    "fsdp+offload": 0.10,
    "zero3+offload-all": 0.08,
}
"""Model-FLOPs utilisation (model FLOPs done / peak) assumed per row of launcher.planning.rows.CANDIDATES, bf16 on
H100-class GPUs. Assumptions to plan with, not measurements of this launcher (none was lent a GPU yet):

- fsdp, zero3: torchtitan reports 33-39% MFU for Llama-3.1-8B under FSDP2 on 8 H100s, bf16 (docs/performance.md,
  with and without torch.compile); 0.35 for both parameter-sharding rows, which gather every block twice a step.
- ddp, zero1, zero2: whole parameters, one gradient all-reduce (or reduce-scatter) overlapped with backward: a
  little above the sharded rows; ZeRO-2's bucketed reduce-scatter a little below DDP.
- offload rows: the host steps the optimizer (CPU Adam) and PCIe carries gradients and weights each step; neither
  grows with the GPU, so on an H100 far below ZeRO-Offload's published 40 of 125 TFLOPS on a V100. Offloading the
  parameters too (fsdp+offload, zero3+offload-all) moves the whole model over PCIe in every forward and backward:
  lowest. With a frozen base the optimizer-only rows step just the adapter on the host (`utilisation`).

Small models (hidden below about 2048) and short sequences reach less: their matmuls do not fill the GPU."""

QUANTIZED_FACTOR = 0.7
"""Utilisation multiplier for a 4-bit (QLoRA) or 8-bit (LoRA-8bit) base: bitsandbytes dequantizes each weight
before its matmul in forward and again in backward, commonly reported as 20-40% slower than 16-bit LoRA; an
assumption like UTILISATION (LLM.int8's outlier decomposition is often slower still)."""

OPTIMIZER_OFFLOAD = {"zero2+offload": "zero2", "zero3+offload": "zero3"}
"""Rows that offload only the optimizer, and the row they are otherwise: with a frozen base its host step is tiny."""

BLOCK = re.compile(r"\.\d+\.")
"""A module name inside a repeated block (`model.layers.3.mlp`): what activation checkpointing recomputes."""


def flops_per_token(
    counts: Counts, config: dict, cfg: RunConfig, seq_len: int, heads: tuple[str, ...] = ()
) -> dict[str, int]:
    """Training FLOPs per token (a multiply-add is 2 FLOPs), the standard accounting (Kaplan et al. 2020; PaLM,
    appendix B; torchtitan's num_flops_per_token):

    - matmul_params, N: in x out of every nn.Linear, the output embedding (lm_head) and task heads included. An input
      embedding is a lookup, not a matmul; norms, activations and the softmax are elementwise: all left out.
    - matmul: full fine-tuning 6N: forward 2N, backward 2N for the activations' gradients and 2N for the weights'.
      A frozen base (LoRA, DoRA, QLoRA, LoRA-8bit) computes no weight gradients of its own: 4N, plus 6 x the
      adapter's matmul parameters (LoRA's A and B, trained: adapter_params), plus 2N more for a trained task head
      (`heads`: leaf names, peft's modules_to_save). A quantized base does the same FLOPs (it dequantizes, then
      multiplies); its slower kernels are QUANTIZED_FACTOR. DoRA's weight norm is per micro-batch, not per token.
    - attention: 12 x layers x width x seq_len, width = attention heads x head dim (hidden_size for most models):
      QK^T and scores x V cost 4 x width x seq_len per token and layer in forward, twice that in backward. Counted
      over the whole sequence as PaLM does, though a causal kernel skips the masked half.
    - recompute: activation checkpointing runs each block's forward again in backward: 2 x the block linears' (and
      their adapters') parameters + 4 x layers x width x seq_len. The output embedding sits outside the blocks and
      is not recomputed.

    model = matmul + attention (what MFU counts); hardware = model + recompute (what the GPU executes)."""
    n = _matmul(counts.linears)
    adapter = cfg.adapter
    # IA3's rescaling is elementwise: left out. Prompt tuning's virtual tokens are positions the model computes too,
    # and prefix tuning's lengthen attention: both counted per real token below.
    lora = isinstance(adapter, Lora)
    # LoRA's A and B multiply (DoRA's magnitude only scales).
    adapter_params = counts.lora_parameters(adapter.r, adapter.target_modules) if lora else 0
    if isinstance(adapter, Full):
        matmul = 6 * n
    else:
        head_modules = {m for m in counts.skipped if m.rsplit(".", 1)[-1] in heads}
        trained_heads = _matmul([lin for lin in counts.linears if within(lin.name, head_modules)])
        matmul = 4 * n + 2 * trained_heads + 6 * adapter_params
    layers, width = config.get("num_hidden_layers", 0), attention_width(config)
    virtual = getattr(adapter, "num_virtual_tokens", 0)
    attention = 12 * layers * width * (seq_len + virtual)
    if isinstance(adapter, PromptTuning):  # every position of the longer sequence, per real token
        matmul = matmul * (seq_len + virtual) // seq_len
        attention = attention * (seq_len + virtual) // seq_len
    recompute = 0
    if cfg.activation_checkpointing:
        in_blocks = _matmul([lin for lin in counts.linears if BLOCK.search(lin.name)])
        adapters_in_blocks = (
            counts.lora_parameters(adapter.r, adapter.target_modules, where=BLOCK.search) if lora else 0
        )
        recompute = 2 * (in_blocks + adapters_in_blocks) + 4 * layers * width * seq_len
    return {
        "model": matmul + attention,
        "hardware": matmul + attention + recompute,
        "matmul_params": n,
        "adapter_params": adapter_params,
        "matmul": matmul,
        "attention": attention,
        "recompute": recompute,
    }


def attention_width(config: dict) -> int:
    """Attention heads x head dim: what QK^T and scores x V contract over (GQA shares K and V, not this width)."""
    hidden = config.get("hidden_size", 0)
    heads = config.get("num_attention_heads", 0)
    if not heads:
        return hidden
    return heads * (config.get("head_dim") or hidden // heads)


def _matmul(linears: list[Linear]) -> int:
    return sum(lin.in_features * lin.out_features for lin in linears)


def utilisation(strategy: str, quantized: bool, frozen_base: bool = False) -> float:
    """UTILISATION of a candidate row, times QUANTIZED_FACTOR for a 4-bit or 8-bit base. With a frozen base an
    optimizer-only offload row steps only the adapter on the host, so it runs as its stage without offload."""
    if strategy not in UTILISATION:
        raise ValueError(f"strategy {strategy!r} has no stated utilisation; known: {', '.join(UTILISATION)}")
    if frozen_base:
        strategy = OPTIMIZER_OFFLOAD.get(strategy, strategy)
    return UTILISATION[strategy] * (QUANTIZED_FACTOR if quantized else 1.0)


def epoch_seconds(
    flops: dict[str, int],
    tokens: int,
    world: int,
    strategy: str,
    quantized: bool,
    peak_tflops: float = PEAK_TFLOPS,
) -> float:
    """Seconds for one pass over `tokens`: tokens x hardware FLOPs per token / (world x peak x utilisation).
    `flops` is flops_per_token's; its adapter_params says whether the base is frozen (see utilisation)."""
    if world < 1 or peak_tflops <= 0:
        raise ValueError(f"world={world}, peak_tflops={peak_tflops}: both must be positive")
    share = utilisation(strategy, quantized, frozen_base=flops.get("adapter_params", 0) > 0)
    return tokens * flops["hardware"] / (world * peak_tflops * 1e12 * share)
