"""Instruction tuning pieces: prompt templates, response-only labels, packing, and greedy generation.

Loss is taken on response tokens only: prompt tokens get the label IGNORE. An example is a list of segments
(token ids, trained or not); the label of each token says whether it is learnt.

Packing puts several examples into one row of `max_length` tokens. Position ids restart at 0 for each example,
and the model is called with no attention mask: transformers then reads the restarts as sequence boundaries and
builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so no token attends to another
example (eager and sdpa attention alike; flash-attention uses the same position ids). The first token of every
example is also unlabelled, so no example's first token is predicted from the one before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100

# The Stanford Alpaca prompt, as the dataset was written for.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Built-in chat template for tokenizers without one: each turn is "<|role|>\n" + content, ending "\n"; the
# assistant's content is followed by the EOS token (learnt, so generation knows when to stop).
CHAT_TURN = "<|{role}|>\n"
ROLES = ("system", "user", "assistant")


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    if input_text and input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def alpaca_prompt_ids(tokenizer: Any, instruction: str, input_text: str | None) -> list[int]:
    """BOS + the Alpaca prompt: what the response follows, in training and in generation."""
    return _bos(tokenizer) + _ids(tokenizer, alpaca_prompt(instruction, input_text))


def encode_alpaca(tokenizer: Any, instruction: str, input_text: str | None, output: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS + prompt (unlabelled) + response + EOS (labelled)."""
    prompt = alpaca_prompt_ids(tokenizer, instruction, input_text)
    response = _ids(tokenizer, output) + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE] * len(prompt) + response


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a conversation so far plus the opening of the assistant's turn (what generation starts from)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = _bos(tokenizer)
    for m in messages:
        ids += _ids(tokenizer, CHAT_TURN.format(role=m["role"]) + m["content"] + "\n")
    return ids + _ids(tokenizer, CHAT_TURN.format(role="assistant"))


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; only the assistant turns are labelled."""
    if tokenizer.chat_template:
        return _encode_with_template(tokenizer, messages)
    ids, labels = list(_bos(tokenizer)), [IGNORE] * len(_bos(tokenizer))
    for m in messages:
        head = _ids(tokenizer, CHAT_TURN.format(role=m["role"]))
        if m["role"] == "assistant":
            body = _ids(tokenizer, m["content"]) + [tokenizer.eos_token_id]
            tail = _ids(tokenizer, "\n")
            ids += head + body + tail
            labels += [IGNORE] * len(head) + body + [IGNORE] * len(tail)
        else:
            turn = _ids(tokenizer, CHAT_TURN.format(role=m["role"]) + m["content"] + "\n")
            ids += turn
            labels += [IGNORE] * len(turn)
    return ids, labels


def _encode_with_template(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The tokenizer's own chat template. Each assistant turn is found as text: it runs from the end of the
    conversation rendered up to that turn's generation prompt to the end of it rendered through the turn. The
    whole text is tokenized once and every token overlapping such a span is labelled (token boundaries can
    straddle the split, e.g. a space merged into the answer's first word). Templates whose rendering of a prefix
    is not a prefix of the whole cannot be split this way and are refused."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the tokenizer's chat template renders a conversation's prefix differently from the whole")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        token if any(a < end and b > start for start, end in spans) else IGNORE
        for token, (a, b) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return ids[:max_length], labels[:max_length]


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (best fit, longest first: rows come out
    nearly full). Each example lies whole in one row; the order inside a row follows the example order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row number), sorted
    for i in order:
        need = lengths[i]
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - need, len(rows) - 1))
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            bisect.insort(free, (room - need, row))
    return [sorted(r) for r in rows]


def packed_row(examples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """One packed row: ids and labels concatenated, position ids restarting at 0 per example, and each
    example's first token unlabelled (it would otherwise be predicted from the previous example)."""
    ids, labels, positions = [], [], []
    for example_ids, example_labels in examples:
        ids += example_ids
        labels += [IGNORE] + example_labels[1:]
        positions += list(range(len(example_ids)))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2", "eager": "eager"}
"""attention= values and the transformers attn_implementation each stands for."""


def attention_implementation(setting: str, *, packing: bool, cuda: bool, flash_installed: bool) -> str:
    """transformers' attn_implementation for `attention=`. Packed rows (positions restarting per example, no mask)
    keep a fast kernel under flash (varlen: each example's span found from the position ids) and flex (a block
    mask built from them); sdpa gets a dense [rows, 1, L, L] block-diagonal mask. auto: on GPUs, packed rows go to
    flash-attn when it is installed and to flex otherwise; padded rows, and every row on CPUs, to sdpa (flex
    compiles for about a minute on a CPU and its packed logits are sdpa's: measured, not faster)."""
    if setting != "auto":
        return ATTENTION[setting]
    if cuda and packing:
        return "flash_attention_2" if flash_installed else "flex_attention"
    return "sdpa"


def collate_packed(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to the longest; the padding is a sequence of its own (positions from 0, no labels)
    and no attention mask is passed, so the model reads the boundaries from the position ids."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        out["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        out["labels"].append(r["labels"] + [IGNORE] * pad)
        out["position_ids"].append(r["position_ids"] + list(range(pad)))
    return {k: torch.tensor(v) for k, v in out.items()}


def collate_padded(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded, with an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    return {
        "input_ids": torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows]),
    }


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token negative log-likelihood over labelled tokens, and their count."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return nll.sum(1), (target != IGNORE).sum(1)


def greedy(
    forward,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    cache: bool = True,
) -> list[list[int]]:
    """Greedy continuations of `prompts` through `forward(batch) -> outputs` (the engine's, so it works under every
    strategy). Always runs the same forwards whatever comes out, even after EOS: under ZeRO-3 and FSDP every rank
    must join every forward, so no rank may stop early. With `cache`, the prompts go as one batch (padded on the
    left, positions counted from each prompt's first token) and each forward after the first computes one new
    position from the keys and values before it: max_new_tokens forwards in all. Without (an adapter that brings
    past keys and values of its own, prefix tuning), each prompt's whole sequence is computed again at every token,
    one prompt after another, as training saw it. Returns each prompt's new tokens up to (not including) EOS."""
    if not cache:
        return _cut([_greedy_recomputed(forward, p, max_new_tokens, device) for p in prompts], eos_id)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
    new = []
    for _ in range(max_new_tokens):
        outputs = forward(batch)
        tokens = outputs.logits[:, -1].argmax(-1, keepdim=True)
        new.append(tokens)
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        positions = positions[:, -1:] + 1
        batch = {
            "input_ids": tokens,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            "past_key_values": outputs.past_key_values,
        }
    return _cut(torch.cat(new, dim=1).tolist(), eos_id)


def _greedy_recomputed(forward, prompt: list[int], max_new_tokens: int, device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


def _cut(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
