"""The CRF head against brute-force enumeration of all paths on tiny cases, plus BIO constraints, gradients, bf16."""

from __future__ import annotations

import itertools

import pytest
import torch

from launcher.tasks.crf import CRF, DISALLOWED_SCORE, bio_constraints

BIO4 = ["O", "B-PER", "I-PER", "B-LOC"]
BIO5 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
LENGTHS = [4, 2, 1]  # batch of 3 rows with different lengths, W = 4


def _crf(num_tags: int, labels: list[str] | None, seed: int) -> CRF:
    """A CRF with random non-zero parameters, so every score term matters in the comparison."""
    allowed, allowed_start = bio_constraints(labels) if labels else (None, None)
    crf = CRF(num_tags, allowed, allowed_start)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        crf.transitions.copy_(torch.randn(num_tags, num_tags, generator=gen))
        crf.start.copy_(torch.randn(num_tags, generator=gen))
        crf.end.copy_(torch.randn(num_tags, generator=gen))
    return crf


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _penalties(num_tags: int, labels: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same penalties the module applies, rebuilt here from the rules rather than read from the module."""
    if not labels:
        return torch.zeros(num_tags, num_tags, dtype=torch.float64), torch.zeros(num_tags, dtype=torch.float64)
    allowed, allowed_start = bio_constraints(labels)
    trans = torch.where(allowed, 0.0, DISALLOWED_SCORE).double()
    start = torch.where(allowed_start, 0.0, DISALLOWED_SCORE).double()
    return trans, start


def _path_score(crf: CRF, labels: list[str] | None, emissions: torch.Tensor, path: tuple[int, ...]) -> float:
    """Score of one path of one row (emissions [L, C]), in float64, written out term by term."""
    trans_pen, start_pen = _penalties(crf.num_tags, labels)
    trans, start, end = (p.detach().double() for p in (crf.transitions, crf.start, crf.end))
    em = emissions.double()
    score = start[path[0]] + start_pen[path[0]] + em[0, path[0]]
    for t in range(1, len(path)):
        score = score + trans[path[t - 1], path[t]] + trans_pen[path[t - 1], path[t]] + em[t, path[t]]
    return float(score + end[path[-1]])


def _all_paths(crf: CRF, labels: list[str] | None, emissions: torch.Tensor) -> dict[tuple[int, ...], float]:
    return {
        path: _path_score(crf, labels, emissions, path)
        for path in itertools.product(range(crf.num_tags), repeat=emissions.size(0))
    }


def _valid_bio(path: list[int], labels: list[str]) -> bool:
    previous = "O"
    for index in path:
        tag = labels[index]
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return False
        previous = tag
    return True


def _random_gold(labels: list[str] | None, num_tags: int, length: int, gen: torch.Generator) -> list[int]:
    """A random gold path; under constraints a valid one, so the NLL stays O(10) and 1e-5 is a fair tolerance."""
    while True:
        path = torch.randint(0, num_tags, (length,), generator=gen).tolist()
        if not labels or _valid_bio(path, labels):
            return path


CASES = [(4, BIO4), (3, None)]


@pytest.mark.parametrize("num_tags,labels", CASES, ids=["bio4", "free3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_equals_brute_force(num_tags, labels, seed):
    crf = _crf(num_tags, labels, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    width = max(LENGTHS)
    emissions = torch.randn(len(LENGTHS), width, num_tags, generator=gen)
    mask = _mask(LENGTHS, width)
    tags = torch.full((len(LENGTHS), width), -100, dtype=torch.long)  # -100 on padding must never be indexed
    for row, length in enumerate(LENGTHS):
        tags[row, :length] = torch.tensor(_random_gold(labels, num_tags, length, gen))

    expected = []
    for row, length in enumerate(LENGTHS):
        scores = _all_paths(crf, labels, emissions[row, :length])
        log_z = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), dim=0)
        expected.append(float(log_z) - scores[tuple(tags[row, :length].tolist())])

    loss = crf(emissions, mask, tags)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    # Per row too (batch of one), so an error in one row cannot hide behind the mean.
    for row in range(len(LENGTHS)):
        single = crf(emissions[row : row + 1], mask[row : row + 1], tags[row : row + 1])
        assert single.item() == pytest.approx(expected[row], abs=1e-5)


@pytest.mark.parametrize("num_tags,labels", CASES, ids=["bio4", "free3"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_viterbi_equals_brute_force_argmax(num_tags, labels, seed):
    crf = _crf(num_tags, labels, seed)
    gen = torch.Generator().manual_seed(200 + seed)
    width = max(LENGTHS)
    emissions = torch.randn(len(LENGTHS), width, num_tags, generator=gen) * 2
    mask = _mask(LENGTHS, width)

    with torch.no_grad():
        paths = crf(emissions, mask)
    assert paths.dtype == torch.long and paths.shape == (len(LENGTHS), width)
    for row, length in enumerate(LENGTHS):
        scores = _all_paths(crf, labels, emissions[row, :length])
        best = max(scores, key=scores.__getitem__)
        assert paths[row, :length].tolist() == list(best)
        assert paths[row, length:].tolist() == [-1] * (width - length)


def test_bio_decoding_never_starts_or_continues_an_entity_illegally():
    allowed, allowed_start = bio_constraints(BIO5)
    i_per, b_per = BIO5.index("I-PER"), BIO5.index("B-PER")
    # I-PER hugely favoured everywhere, B-PER hugely disfavoured: the only legal way into I-PER is too costly.
    emissions = torch.zeros(1, 4, len(BIO5))
    emissions[..., i_per] = 1000.0
    emissions[..., b_per] = -5000.0
    mask = torch.ones(1, 4, dtype=torch.bool)

    unconstrained = CRF(len(BIO5))(emissions, mask)
    assert unconstrained[0].tolist() == [i_per] * 4  # the case does bite without constraints

    constrained = CRF(len(BIO5), allowed, allowed_start)(emissions, mask)
    assert i_per not in constrained[0].tolist()
    assert _valid_bio(constrained[0].tolist(), BIO5)

    # Random, strongly peaked emissions over many rows of mixed lengths: every decoded path is valid BIO.
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 9, (64,), generator=gen).tolist()
    emissions = torch.randn(64, 8, len(BIO5), generator=gen) * 50
    paths = CRF(len(BIO5), allowed, allowed_start)(emissions, _mask(lengths, 8))
    for row, length in enumerate(lengths):
        assert _valid_bio(paths[row, :length].tolist(), BIO5), [BIO5[i] for i in paths[row, :length]]


def test_gradients_reach_parameters_and_emissions():
    crf = _crf(4, BIO4, seed=3)
    emissions = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    tags = torch.tensor([[1, 2, 0, 3], [0, 3, -100, -100], [1, -100, -100, -100]])
    crf(emissions, _mask(LENGTHS, 4), tags).backward()
    for name in ("transitions", "start", "end"):
        grad = getattr(crf, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert emissions.grad is not None and emissions.grad.abs().sum() > 0
    assert emissions.grad[~_mask(LENGTHS, 4)].abs().sum() == 0  # padding gets no gradient


def test_bf16_emissions_give_finite_float32_loss():
    crf = _crf(5, BIO5, seed=4)
    emissions = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    tags = torch.tensor([[1, 2, 0, 3], [3, 4, -100, -100], [0, -100, -100, -100]])
    loss = crf(emissions, _mask(LENGTHS, 4), tags)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert emissions.grad is not None and emissions.grad.dtype == torch.bfloat16
    assert torch.isfinite(emissions.grad.float()).all()


def test_constraint_penalties_stay_out_of_checkpoints():
    crf = CRF(5, *bio_constraints(BIO5))
    assert set(crf.state_dict()) == {"transitions", "start", "end"}


def test_bio_constraints_rules_and_bad_tag():
    allowed, allowed_start = bio_constraints(BIO5)
    idx = {tag: i for i, tag in enumerate(BIO5)}
    assert allowed[idx["B-PER"], idx["I-PER"]] and allowed[idx["I-PER"], idx["I-PER"]]
    assert not allowed[idx["O"], idx["I-PER"]] and not allowed[idx["B-LOC"], idx["I-PER"]]
    assert not allowed[idx["I-LOC"], idx["I-PER"]]
    assert allowed[idx["I-PER"], idx["B-LOC"]] and allowed[idx["O"], idx["O"]]
    assert allowed_start.tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="E-PER"):
        bio_constraints(["O", "B-PER", "E-PER"])
    with pytest.raises(ValueError, match="'B-'"):
        bio_constraints(["O", "B-"])
