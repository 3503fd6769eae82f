"""Meta-device construction and streamed reads of model folders (launcher/worker/weights.py), in one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.random_folder import tensor_values, write_random_folder
from launcher.worker.memory import limit_heap_retention, rss_mib
from launcher.worker.weights import Folder, Weights, empty_weights, materialize, source_name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny"
    write_random_folder("llama-tiny", str(path), dtype="bf16", seed=5, shard_mb=1, vocab_size=1000)
    return path


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    real = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Rotary frequencies are computed in __init__: on meta they would be lost and every forward would fail.
    assert torch.equal(model.model.rotary_emb.inv_freq, real.model.rotary_emb.inv_freq)
    # Outside the context parameters are real again.
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_folder_reads_whole_tensors_and_row_ranges_across_shards(folder):
    files = Folder(str(folder))
    shards = {f for f in files.where.values()}
    assert len(shards) > 1  # the model spans several files
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        expected = load_file(str(folder / files.where[name]))[name]
        assert torch.equal(files.read(name, None), expected)
        n = expected.shape[0]
        assert torch.equal(files.read(name, (n // 3, n // 2)), expected[n // 3 : n // 2])
        assert files.read(name, (n, n)).shape[0] == 0  # an empty shard (a rank past the last row)


def test_single_file_and_prefixed_names(tmp_path):
    # A folder saved from the bare encoder (no "bert." prefix) still matches the model's names, and vice versa.
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_file({"embeddings.word_embeddings.weight": t}, str(tmp_path / "model.safetensors"))
    files = Folder(str(tmp_path))
    assert files.key("bert.embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert torch.equal(files.read(files.key("bert.embeddings.word_embeddings.weight"), (1, 3)), t[1:3])
    assert files.key("classifier.weight") is None
    # Our tagger calls the encoder `encoder.`; a folder saved by a token classifier calls it `bert.`.
    save_file(
        {"bert.embeddings.word_embeddings.weight": t, "lm_head.weight": t.clone()}, str(tmp_path / "model.safetensors")
    )
    files = Folder(str(tmp_path))
    assert files.key("encoder.embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
    assert files.key("score.weight") is None  # a leaf name alone never matches another module's


def test_bin_checkpoints_are_read_too(tmp_path):
    t = torch.randn(5, 2)
    torch.save({"w": t}, tmp_path / "pytorch_model.bin")
    assert torch.equal(Folder(str(tmp_path)).read("w", (2, 4)), t[2:4])


def test_missing_and_resized_tensors_are_initialised_from_their_name_and_noted(folder):
    w = Weights(str(folder), seed=9, std=0.02)
    new = w.tensor("score.weight", (3, 256), torch.float32)
    assert torch.equal(new, tensor_values("score.weight", (3, 256), seed=9, dtype=torch.float32, std=0.02))
    resized = w.tensor("model.embed_tokens.weight", (77, 256), torch.float32)  # a learnt vocabulary of 77
    assert resized.shape == (77, 256)
    assert any("score.weight: not in the folder" in n for n in w.notes)
    assert any("model.embed_tokens.weight: the folder holds" in n and "(77, 256)" in n for n in w.notes)
    # Present tensors come from the folder, cast to what was asked.
    files = Folder(str(folder))
    got = w.tensor("model.norm.weight", (256,), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, files.read("model.norm.weight", None).float())


def test_random_values_do_not_depend_on_which_rows_are_read():
    w = Weights(None, seed=1, std=0.02)
    whole = w.tensor("model.layers.0.self_attn.q_proj.weight", (8, 4), torch.float32)
    parts = [w.tensor("model.layers.0.self_attn.q_proj.weight", (8, 4), torch.float32, (a, a + 4)) for a in (0, 4)]
    assert torch.equal(torch.cat(parts), whole)


def test_peft_names_map_back_to_the_base_model():
    assert source_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert source_name("base_model.model.classifier.modules_to_save.default.weight") == "classifier.weight"
    assert source_name("base_model.model.classifier.original_module.weight") == "classifier.weight"


def test_materialize_keeps_tied_parameters_tied():
    with empty_weights():
        emb = torch.nn.Embedding(10, 4)
        head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"embed": emb, "head": head})
    made = materialize(model, Weights(None, seed=0, std=0.02), torch.device("cpu"), lambda _: torch.float32)
    assert made == 1
    assert model["head"].weight is model["embed"].weight and model["embed"].weight.device.type == "cpu"


def test_heap_retention_limit_and_rss():
    now, peak = rss_mib()
    assert 0 < now <= peak
    assert limit_heap_retention() is True  # glibc (Linux) here
