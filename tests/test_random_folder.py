"""Random-weight model folders written to disk tensor by tensor (big shapes for loading tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from launcher.errors import ConfigError
from launcher.models import random_shapes
from launcher.random_folder import tensor_values, write_random_folder
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("random") / "llama-tiny"
    write_random_folder("llama-tiny", str(out), dtype="bf16", seed=7, shard_mb=2, vocab_size=1000)
    return out


def test_the_folder_is_sharded_and_loads_with_every_weight_as_written(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    saved = {}
    for name in files:
        saved.update(load_file(str(folder / name)))
    assert set(saved) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in saved.values())
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.bfloat16)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in saved.items())
    assert torch.equal(saved["model.norm.weight"], torch.ones_like(saved["model.norm.weight"]))
    q = saved["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.vocab_size >= len(tok) and tok.pad_token_id is not None


def test_every_tensor_depends_on_the_seed_and_its_name_only():
    a = tensor_values("model.layers.3.mlp.up_proj.weight", (4, 8), seed=1, dtype=torch.float32, std=0.02)
    again = tensor_values("model.layers.3.mlp.up_proj.weight", (4, 8), seed=1, dtype=torch.float32, std=0.02)
    other_seed = tensor_values("model.layers.3.mlp.up_proj.weight", (4, 8), seed=2, dtype=torch.float32, std=0.02)
    other_name = tensor_values("model.layers.4.mlp.up_proj.weight", (4, 8), seed=1, dtype=torch.float32, std=0.02)
    assert torch.equal(a, again) and not torch.equal(a, other_seed) and not torch.equal(a, other_name)


def test_a_written_folder_trains_through_the_recipe(ranks1, folder, tmp_path):
    out = tmp_path / "run"
    settings = [
        f"model={folder}",
        "adapter=lora",
        "train.max_steps=2",
        "train.log_every=1",
        "train.micro_batch_size=4",  # what the assertions need: two steps of a few rows, no evaluation
        "data.max_length=256",
        "data.max_train_rows=32",
        "data.eval=",
        f"output_dir={out}",
    ]
    proc = ranks1.run(str(ROOT / "recipes" / "qlora_sft.py"), settings, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert len(losses) == 2 and all(0 < x < 2 * math.log(vocab) for x in losses), losses  # random: near ln(vocab)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n), "the adapter trained"


def test_big_shapes_are_shipped_and_bad_requests_refused(tmp_path):
    assert {"llama-3.2-1b", "llama-3-8b", "qwen2.5-7b"} <= set(random_shapes())
    with pytest.raises(ConfigError, match="shape random:nope: unknown"):
        write_random_folder("random:nope", str(tmp_path / "x"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        write_random_folder("llama-tiny", str(tmp_path / "taken"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "write_random_model.py"), "nope", str(tmp_path / "y")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown" in proc.stderr and not (tmp_path / "y").exists()


def test_a_given_tokenizer_is_saved_with_the_folder_and_sizes_its_vocabulary(tmp_path):
    """benchmarks/compare.py writes its random Llama with the BPE the recipe learns from the training file."""
    from transformers import AutoConfig, AutoTokenizer

    from launcher.tasks.vocab import bpe_tokenizer

    texts = [f"Write {n} words about the sea, then count to {n}." for n in range(200)]
    tokenizer = bpe_tokenizer(iter(texts), 400)
    folder = tmp_path / "model"
    write_random_folder("llama-tiny", str(folder), dtype="fp32", vocab_size=len(tokenizer), tokenizer=tokenizer)
    saved, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    assert len(saved) == len(tokenizer) == config.vocab_size
    assert saved(texts[7])["input_ids"] == tokenizer(texts[7])["input_ids"]
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
