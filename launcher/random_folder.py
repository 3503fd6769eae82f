"""A random-weight model folder of a shipped shape, written to disk without ever holding the model in memory.

For tests and benchmarks of loading real folders (no hub here). The architecture is built on the meta device for
its parameter names and shapes only; each tensor is then drawn from its own generator, seeded by (seed, name), so
any process can produce any tensor alone and the values do not depend on the order or the sharding. Tensors go
into safetensors shards of about `shard_mb` MB, with the index transformers reads; peak memory is one shard plus
one tensor. A BPE tokenizer learnt from the packaged instruction sample is saved beside it (its vocabulary may be
smaller than the model's: the extra embedding rows are simply never used)."""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable

from launcher.errors import ConfigError
from launcher.models import RANDOM, load_shape, random_config, random_shapes

DTYPES = ("bf16", "fp16", "fp32")


def tensor_values(name: str, shape: tuple[int, ...], *, seed: int, dtype, std: float):
    """The value of tensor `name`: ones for norm weights, zeros for biases, else N(0, std) from its own generator."""
    import torch

    module, _, kind = name.rpartition(".")
    if kind == "weight" and "norm" in module.rpartition(".")[2].lower():  # RMSNorm / LayerNorm scales start at one
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std).to(dtype)


def write_random_folder(
    shape: str,
    folder: str,
    *,
    dtype: str = "bf16",
    seed: int = 0,
    shard_mb: int = 2000,
    vocab_size: int | None = None,
    say: Callable[[str], None] = lambda _: None,
    tokenizer=None,
) -> dict:
    """Write `folder` (config.json, model-XXXXX-of-YYYYY.safetensors shards + index, tokenizer); returns the index.
    Written to `folder.tmp` and renamed, so a folder is never half there. `tokenizer`: the one saved with it (its
    specials' ids in the config); by default a 1,000-token BPE learnt from the packaged instruction sample."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.shards import write_shards

    name = shape[len(RANDOM) :] if shape.startswith(RANDOM) else shape
    if name not in random_shapes():
        raise ConfigError(f"shape {shape}: unknown; shapes: {', '.join(random_shapes())}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if os.path.exists(folder):
        raise ConfigError(f"{folder} already exists: give a new folder")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tokenizer = tokenizer or _tokenizer()
    vocab = vocab_size or load_shape(name)["vocab_size"]
    config = random_config(
        RANDOM + name,
        vocab_size=max(vocab, len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Each tensor once, as save_pretrained writes them: a tied output embedding is the input embedding's.
    saved = set(model.state_dict())
    shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()] if n in saved}
    config.architectures = [type(model).__name__]  # as a real checkpoint's config.json says (launcher plan reads it)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    values = (
        (n, tensor_values(n, tensor_shape, seed=seed, dtype=torch_dtype, std=config.initializer_range))
        for n, tensor_shape in shapes.items()
    )
    index = write_shards(tmp, values, shard_mb=shard_mb, say=say)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return index


def _tokenizer():
    """A byte-level BPE learnt from the packaged instruction sample (every text encodes; no hub)."""
    from launcher.data import load_table
    from launcher.tasks.vocab import bpe_tokenizer

    rows = load_table("sample:sft", "data.train")
    texts = ("\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in rows)
    return bpe_tokenizer(texts, 1000)
