"""qlora_sft pieces: response-only labels, chat templates, packing boundaries, eval loss, generation."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.tasks import sft
from launcher.tasks.sft import IGNORE
from tests.conftest import ROOT, launcher_cli, run, why_failed

RECIPE = str(ROOT / "recipes" / "qlora_sft.py")
TEXTS = [
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "What is the capital of France? The capital of France is Paris.",
    "Reverse the word stone. enots",
] * 20


@pytest.fixture(scope="module")
def tok():
    from launcher.tasks.vocab import bpe_tokenizer

    return bpe_tokenizer(TEXTS, 400)


def _labelled(ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != IGNORE]


def test_alpaca_learns_only_the_response_and_eos(tok):
    ids, labels = sft.encode_alpaca(tok, "Reverse the word.", "stone", "enots")
    assert len(ids) == len(labels)
    learnt = _labelled(ids, labels)
    assert learnt[-1] == tok.eos_token_id and tok.decode(learnt[:-1]) == "enots"
    prompt = ids[: len(ids) - len(learnt)]
    assert ids[0] == tok.bos_token_id and tok.decode(prompt[1:]).endswith("### Input:\nstone\n\n### Response:\n")
    assert all(lab == IGNORE for lab in labels[: len(prompt)])
    no_input, _ = sft.encode_alpaca(tok, "Say hi.", "", "hi")
    assert "### Input" not in tok.decode(no_input)


def test_builtin_chat_template_learns_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ids, labels = sft.encode_chat(tok, messages)
    learnt = _labelled(ids, labels)
    eos = tok.eos_token_id
    cut = learnt.index(eos)
    assert tok.decode(learnt[:cut]) == "Paris." and tok.decode(learnt[cut + 1 : -1]) == "Rome." and learnt[-1] == eos
    text = tok.decode(ids)
    assert "<|user|>\nCapital of France?\n<|assistant|>\nParis." in text
    prompt = sft.chat_prompt_ids(tok, messages[:2])
    assert tok.decode(prompt).endswith("<|assistant|>\n") and ids[: len(prompt)] == prompt


def test_the_tokenizers_own_chat_template_is_used_when_present(tok):
    from copy import deepcopy

    templated = deepcopy(tok)
    templated.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids, labels = sft.encode_chat(templated, messages)
    assert tok.decode(ids).startswith("[user] Capital of France?[assistant] ")
    # " Paris" may be one token with the template's trailing space: it is learnt (it overlaps the answer)
    assert templated.decode(_labelled(ids, labels)).strip() == "Paris.</s>"
    assert all(lab == IGNORE for lab in labels[:5]) and labels[-1] == tok.eos_token_id


def test_truncation_keeps_the_front():
    assert sft.truncate([1, 2, 3, 4], [IGNORE, 2, 3, 4], 3) == ([1, 2, 3], [IGNORE, 2, 3])


def test_pack_places_every_example_once_and_fills_rows():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(500)]
    rows = sft.pack(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.95
    row = sft.packed_row([([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [8, 9])])
    assert row == {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "position_ids": [0, 1, 2, 0, 1]}


def _tiny_llama(vocab: int, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from launcher.models import random_config

    cfg = random_config("random:llama-tiny", vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attention).eval()


def test_packed_examples_do_not_see_each_other():
    """Logits of each example inside a packed row equal its logits alone; the loss over the row equals the
    loss of the examples alone. Without restarting positions (one long sequence) they would not."""
    _check_packed(_tiny_llama(64))


@pytest.mark.long
def test_packed_examples_do_not_see_each_other_under_flex_attention():
    """attention=flex: the block mask transformers builds from the packed position ids, not a dense mask (flex
    compiles, about 45 s on this CPU)."""
    model = _tiny_llama(64, attention="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    _check_packed(model)


def test_attention_auto_keeps_packed_rows_on_a_fast_kernel_on_gpus_and_sdpa_on_cpus():
    pick = sft.attention_implementation
    assert pick("auto", packing=True, cuda=True, flash_installed=True) == "flash_attention_2"
    assert pick("auto", packing=True, cuda=True, flash_installed=False) == "flex_attention"
    assert pick("auto", packing=False, cuda=True, flash_installed=True) == "sdpa"
    assert pick("auto", packing=True, cuda=False, flash_installed=False) == "sdpa"
    assert pick("flex", packing=False, cuda=False, flash_installed=False) == "flex_attention"
    assert pick("eager", packing=True, cuda=True, flash_installed=True) == "eager"


def test_attention_flash_without_a_gpu_is_a_usage_error_naming_the_setting(tmp_path):
    proc = run(
        ["python", RECIPE, "attention=flash", "train.max_steps=1", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert proc.returncode == 2, why_failed(proc)
    assert "attention=flash: flash-attn runs on GPUs only; use attention=auto" in proc.stderr
    assert "Traceback" not in proc.stderr


def _check_packed(model) -> None:
    a = ([2, 10, 11, 12, 13], [IGNORE, IGNORE, 11, 12, 13])
    b = ([2, 20, 21, 22], [IGNORE, IGNORE, 21, 22])
    c = ([2, 30, 31], [IGNORE, 30, 31])
    batch = sft.collate_packed([sft.packed_row([a, b]), sft.packed_row([c])], pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        packed = model(**batch).logits
        alone = [model(input_ids=torch.tensor([x[0]])).logits[0] for x in (a, b, c)]
        torch.testing.assert_close(packed[0, :5], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[0, 5:9], alone[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[1, :3], alone[2], atol=1e-5, rtol=1e-5)
        joined = model(input_ids=batch["input_ids"][:1], attention_mask=torch.ones(1, 9, dtype=torch.long)).logits
        assert not torch.allclose(joined[0, 5:9], alone[1], atol=1e-3), "the check cannot tell packed from joined"

        nll, count = sft.token_losses(packed, batch["labels"])
        separate = [sft.token_losses(lg[None], torch.tensor([x[1]])) for lg, x in zip(alone, (a, b, c))]
        # b's first token (2) is unlabelled in the packed row; its other labels count as alone
        assert count.tolist() == [3 + 2, 2]
        torch.testing.assert_close(nll[0], separate[0][0][0] + separate[1][0][0])
        torch.testing.assert_close(nll[1], separate[2][0][0])


def test_token_losses_match_the_models_own_loss():
    model = _tiny_llama(64)
    batch = sft.collate_padded(
        [
            {"input_ids": [2, 5, 6, 7], "labels": [IGNORE, IGNORE, 6, 7]},
            {"input_ids": [2, 8, 9], "labels": [IGNORE, 8, 9]},
        ],
        0,
    )
    with torch.no_grad():
        out = model(**batch)
    nll, count = sft.token_losses(out.logits, batch["labels"])
    torch.testing.assert_close(nll.sum() / count.sum(), out.loss)


def test_greedy_runs_every_step_and_cuts_at_eos():
    calls = []

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def forward(batch):
        calls.append(batch["input_ids"].shape[1])
        logits = torch.zeros(1, batch["input_ids"].shape[1], 10)
        logits[0, -1, 7 if len(calls) < 3 else 3] = 1.0  # 7, 7, then EOS (3)
        return Out(logits)

    assert sft.greedy(forward, [[1, 2]], 6, eos_id=3, pad_id=0, device=torch.device("cpu"), cache=False) == [[7, 7]]
    assert calls == [2, 3, 4, 5, 6, 7], "every rank must run all max_new_tokens forwards"


def test_greedy_batches_the_prompts_with_the_cache_and_generates_what_each_alone_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    shapes = []

    def forward(batch):
        shapes.append(tuple(batch["input_ids"].shape))
        return model(**batch)

    prompts = [[1, 5, 9, 4], [7, 2], [3, 3, 8, 1, 6, 2]]
    cpu = torch.device("cpu")
    with torch.no_grad():
        batched = sft.greedy(forward, prompts, 12, eos_id=-1, pad_id=0, device=cpu)
        assert shapes == [(3, 6)] + [(3, 1)] * 11, "one batch; one new position per forward after the first"
        alone = sft.greedy(forward, prompts, 12, eos_id=-1, pad_id=0, device=cpu, cache=False)
    assert batched == alone and all(len(set(r)) > 1 for r in batched)
    eos = batched[1][3]
    with torch.no_grad():
        cut = sft.greedy(forward, prompts, 12, eos_id=eos, pad_id=0, device=cpu)
    assert cut[1] == batched[1][: batched[1].index(eos)]


def test_bpe_tokenizer_is_cached_and_identical(tmp_path):
    from launcher.overrides import apply_overrides
    from launcher.recipe import load_recipe
    from launcher.tasks.vocab import bpe_tokenizer, learnt_tokenizer

    built = []

    def build():
        built.append(1)
        return bpe_tokenizer(TEXTS, 400)

    cfg = apply_overrides(load_recipe(str(ROOT / "recipes" / "qlora_sft.py")).Config(), [f"data.cache_dir={tmp_path}"])
    first = learnt_tokenizer(cfg, build)
    second = learnt_tokenizer(cfg, build)
    assert len(built) == 1 and first.get_vocab() == second.get_vocab()
    assert second("Paris is the capital.")["input_ids"] == first("Paris is the capital.")["input_ids"]
    assert (second.pad_token, second.bos_token, second.eos_token) == ("<pad>", "<s>", "</s>")


def test_recipe_tokenizer_reused_without_reading_the_data_and_relearnt_when_the_rows_change(tmp_path, monkeypatch):
    from launcher.overrides import apply_overrides
    from launcher.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "qlora_sft.py"))
    reads = []
    real_read = recipe._read
    monkeypatch.setattr(recipe, "_read", lambda *a: reads.append(1) or real_read(*a))
    cfg = apply_overrides(recipe.Config(), [f"data.cache_dir={tmp_path}", "tokenizer_vocab=400"])
    first = recipe.build_tokenizer(cfg)
    assert len(reads) == 1
    second = recipe.build_tokenizer(cfg)
    assert len(reads) == 1, "a cached tokenizer must not read the data again"
    assert second.get_vocab() == first.get_vocab()
    recipe.build_tokenizer(apply_overrides(cfg, ["data.max_train_rows=50"]))
    assert len(reads) == 2, "other rows: another vocabulary"


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, expected",
    [
        (
            [{"question": "q", "answer": "a"}],
            "has neither data.messages_field=messages (chat) nor data.instruction_field",
        ),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: roles ['user']"),
        ([{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}], "roles must be"),
        ([{"instruction": "x", "output": 3}], "data.output_field=output holds 3 (int), expected a string"),
    ],
)
def test_bad_data_stops_before_any_worker(tmp_path, rows, expected):
    train = _rows(tmp_path / "train.jsonl", rows)
    proc = launcher_cli(["run", RECIPE, f"data.train={train}", "data.eval=", "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_chat_rows_train_and_generate(ranks1, tmp_path):
    """A chat dataset end to end in one process: trains, evaluates, writes generations."""
    convo = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    train = _rows(tmp_path / "train.jsonl", [{"messages": convo}] * 40)
    out = tmp_path / "run"
    settings = [
        f"data.train={train}",
        f"data.eval={train}",
        "data.max_eval_rows=4",
        "data.generations=2",
        "data.max_new_tokens=4",
        "tokenizer_vocab=300",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        f"output_dir={out}",
    ]
    proc = ranks1.run(RECIPE, settings, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and generations[0]["reference"] == "Paris."
    assert generations[0]["prompt"].endswith("<|assistant|>\n")
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)


SLOW_FINISH = str(ROOT / "tests" / "helpers" / "slow_finish_sft.py")


def test_generations_longer_than_the_watchdog_finish_and_the_adapter_comes_first(ranks2, tmp_path):
    """The end-of-run generations: under FSDP2 (sharded forwards, one batch of prompts with the cache); slowed so
    that they take longer than the watchdog's timeout in all, every forward is progress (the run ends, exit 0); a
    finish that fails loses nothing of the training (the adapter is saved before it)."""
    settings = ["train.max_steps=2", "data.max_length=128", "train.micro_batch_size=2", "data.max_eval_rows=4",
                "data.generations=2", "data.max_new_tokens=12"]  # fmt: skip
    out = tmp_path / "fsdp"
    proc = ranks2.run(RECIPE, [*settings, "strategy=fsdp", f"output_dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(isinstance(g["generated"], str) for g in generations), generations
    # 12 forwards of 1 s each against a timeout of 5 s (a DDP step here takes well under a second).
    out = tmp_path / "slow"
    proc = ranks2.run(SLOW_FINISH, [*settings, "watchdog.timeout=5", f"output_dir={out}"], cwd=tmp_path,
                      env={"SLOW_FINISH_SECONDS": "1"})  # fmt: skip
    assert proc.returncode == 0, why_failed(proc)
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "fails"
    proc = ranks2.run(SLOW_FINISH, [*settings, f"output_dir={out}"], cwd=tmp_path, env={"FINISH_FAILS": "1"})
    assert proc.returncode == 1 and "the recipe's finish failed" in proc.stderr, why_failed(proc)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert not (out / "generations.jsonl").exists()


def test_a_max_length_that_leaves_no_response_is_refused_before_any_rank_starts(tmp_path):
    out = tmp_path / "run"
    for dry in (["--dry-run"], []):
        proc = launcher_cli(
            ["run", RECIPE, "--nproc", "2", *dry, "data.max_length=64", f"output_dir={out}"], cwd=tmp_path
        )
        said = "data.train=sample:sft: no row keeps a response within data.max_length=64"
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "starting 2 process(es)" not in proc.stdout and not out.exists()
