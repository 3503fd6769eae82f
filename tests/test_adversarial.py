"""Adversarial training on the word embeddings (train.adversarial=fgm|pgd): the perturbation and the update against
the textbook implementations (which move the embedding matrix itself), on a tiny model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from launcher.worker.adversarial import Adversary
from launcher.worker.strategies.base import accumulate_and_step

V, H, LR, EPS, ALPHA = 12, 4, 0.1, 0.5, 0.2


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, H)
        self.out = torch.nn.Linear(H, 2)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, labels):
        logits = self.out(torch.tanh(self.emb(input_ids)).mean(1))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def _batches():
    g = torch.Generator().manual_seed(0)
    # Token 3 occurs in both rows of the first batch: its gradient is the sum over its occurrences.
    first = {"input_ids": torch.tensor([[3, 1, 4, 3], [5, 3, 2, 6]]), "labels": torch.tensor([0, 1])}
    second = {"input_ids": torch.randint(0, V, (2, 4), generator=g), "labels": torch.tensor([1, 0])}
    return [first, second]


def _textbook_grads(model: Tiny, batch: dict, kind: str, steps: int = 3) -> list[torch.Tensor]:
    """One micro-batch's gradients as the usual FGM / PGD code computes them: backward, move the embedding
    matrix along its gradient, backward again there, move it back."""
    model.zero_grad()
    w = model.emb.weight
    model(**batch).loss.backward()
    original = w.data.clone()
    if kind == "fgm":
        w.data += EPS * w.grad / w.grad.norm()
        model(**batch).loss.backward()
    else:
        clean = {n: p.grad.clone() for n, p in model.named_parameters()}
        r = torch.zeros_like(w)
        for t in range(steps):
            r = r + ALPHA * w.grad / w.grad.norm()
            r = r * min(1.0, EPS / r.norm().item())
            w.data = original + r
            if t < steps - 1:
                model.zero_grad()
            else:
                for n, p in model.named_parameters():
                    p.grad = clean[n].clone()
            model(**batch).loss.backward()
    w.data = original
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_the_update_equals_the_textbook_one_also_under_accumulation(kind):
    torch.manual_seed(0)
    theirs, ours = Tiny(), None
    ours = copy.deepcopy(theirs)
    batches = _batches()
    # Accumulated over two micro-batches: each perturbed by its own gradient, the mean of their gradients applied.
    per_batch = [_textbook_grads(theirs, b, kind) for b in batches]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(theirs.parameters(), *per_batch)]

    adversary = Adversary(ours.emb, kind, EPS, alpha=ALPHA, steps=3)
    optimizer = torch.optim.SGD(ours.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sync, at_forward = [None], []

    def forward(b):
        at_forward.append(sync[0])
        return ours(**b)

    result = accumulate_and_step(
        batches,
        forward=forward,
        set_sync=lambda on: sync.__setitem__(0, on),
        optimizer=optimizer,
        scheduler=scheduler,
        params=list(ours.parameters()),
        max_grad_norm=0,
        micro_loss=adversary.micro_loss,
    )
    for got, want in zip(ours.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # Only the last micro-batch's adversarial forward syncs gradients; its clean (and pgd's) forwards do not.
    forwards = 2 if kind == "fgm" else 1 + 3  # clean, (pgd: 2 more moves,) adversarial
    assert at_forward == [False] * forwards + [False] * (forwards - 1) + [True]
    # The reported loss is the clean one (the mean over the micro-batches, at the weights before the step).
    torch.manual_seed(0)
    start = Tiny()
    clean = sum(start(**b).loss.item() for b in batches) / 2
    assert result.loss.item() == pytest.approx(clean, rel=1e-6)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_the_perturbation_norm_direction_and_the_untouched_embedding(kind):
    torch.manual_seed(1)
    model = Tiny()
    batch = _batches()[0]
    before = model.emb.weight.detach().clone()
    adversary = Adversary(model.emb, kind, EPS, alpha=ALPHA, steps=1 if kind == "pgd" else 3)
    loss, clean = adversary.micro_loss(lambda b: model(**b), batch, lambda _: None, True)
    # The perturbation, as a matrix over the vocabulary: the rows of the batch's tokens only.
    ids = batch["input_ids"].unique()
    r = torch.zeros(V, H)
    r[ids] = adversary.last_rows
    model.zero_grad()
    model(**batch).loss.backward()
    g = model.emb.weight.grad
    size = EPS if kind == "fgm" else ALPHA  # one pgd step of alpha < epsilon
    assert r.norm().item() == pytest.approx(size, rel=1e-5)
    assert torch.nn.functional.cosine_similarity(r.flatten(), g.flatten(), dim=0).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(r.abs().sum(1)) == len(ids)
    # The embedding matrix was never written, and with the loss taken the hook adds nothing any more.
    assert torch.equal(model.emb.weight.detach(), before)
    assert torch.equal(model(**batch).logits, model(**batch).logits)
    with torch.no_grad():
        plain = model.out(torch.tanh(torch.nn.functional.embedding(batch["input_ids"], before)).mean(1))
    assert torch.equal(model(**batch).logits.detach(), plain)
    assert loss.item() > clean.item()  # the adversarial loss is higher than the clean one


def test_pgd_stays_within_epsilon():
    torch.manual_seed(2)
    model = Tiny()
    adversary = Adversary(model.emb, "pgd", 0.3, alpha=0.25, steps=4)  # 4 x 0.25 would leave the 0.3 ball
    adversary.micro_loss(lambda b: model(**b), _batches()[1], lambda _: None, True)
    assert adversary.last_rows.norm().item() == pytest.approx(0.3, rel=1e-5)
