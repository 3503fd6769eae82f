"""Entity-level scoring on hand-made sentences, with the expected numbers worked out by hand."""

from __future__ import annotations

import pytest

from launcher.tasks.spans import bio_spans, span_scores


def test_bio_spans_basic_and_conlleval_chunking():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    # I-X after O opens a chunk (IOB1-tolerant), and so does I-X at the very start.
    assert bio_spans(["O", "I-PER", "I-PER"]) == {("PER", 1, 3)}
    assert bio_spans(["I-LOC", "O"]) == {("LOC", 0, 1)}
    # Adjacent B-X B-X are two chunks; I-Y after X closes X and opens Y.
    assert bio_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert bio_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}
    assert bio_spans(["O", "O"]) == set() and bio_spans([]) == set()


def test_exact_match_is_perfect():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    scores = span_scores(gold, gold)
    for key in ("PER", "LOC", "ORG", "overall"):
        assert scores[key]["precision"] == scores[key]["recall"] == scores[key]["f1"] == 1.0
    assert scores["overall"]["support"] == 3


def test_wrong_boundary_is_a_false_positive_and_a_false_negative():
    scores = span_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
    assert scores["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_wrong_type_counts_against_both_types():
    scores = span_scores([["B-PER", "I-PER"]], [["B-LOC", "I-LOC"]])
    assert scores["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # LOC appears only in the predictions: listed, with support 0 and its false positive visible.
    assert scores["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["overall"]["precision"] == 0.0 and scores["overall"]["support"] == 1


def test_i_after_o_starts_a_chunk_that_can_match():
    scores = span_scores([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])
    assert scores["PER"]["f1"] == 1.0


def test_adjacent_b_b_are_two_spans():
    # Gold: PER[0,1) and PER[1,2). Pred B-PER I-PER: one PER[0,2), matching neither.
    scores = span_scores([["B-PER", "B-PER"]], [["B-PER", "I-PER"]])
    assert scores["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    scores = span_scores([["B-PER", "B-PER"]], [["B-PER", "B-PER"]])
    assert scores["PER"]["f1"] == 1.0 and scores["PER"]["support"] == 2


def test_per_type_and_overall_numbers_by_hand():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],  # PER[0,2)  LOC[3,4)
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],  # ORG[0,3)  PER[4,5)
        ["O", "B-LOC", "I-LOC", "O", "O"],  # LOC[1,3)
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],  # PER[0,2) ok, LOC[3,4) ok
        ["B-ORG", "I-ORG", "O", "O", "B-PER"],  # ORG[0,2) wrong boundary, PER[4,5) ok
        ["O", "B-LOC", "I-LOC", "O", "B-MISC"],  # LOC[1,3) ok, MISC[4,5) only in pred
    ]
    scores = span_scores(gold, pred)
    assert set(scores) == {"PER", "LOC", "ORG", "MISC", "overall"}
    # PER: tp 2, pred 2, gold 2 -> P = R = F1 = 1.
    assert scores["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    # LOC: tp 2, pred 2, gold 2 -> 1.
    assert scores["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    # ORG: tp 0, pred 1, gold 1 -> 0.
    assert scores["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # MISC: tp 0, pred 1, gold 0 -> 0, support 0.
    assert scores["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Overall (micro): tp = 2 + 2 = 4, pred = 2 + 2 + 1 + 1 = 6, gold = 2 + 2 + 1 = 5.
    precision, recall = 4 / 6, 4 / 5
    f1 = 2 * precision * recall / (precision + recall)  # = 2 * (2/3) * (4/5) / (22/15) = 8/11
    overall = scores["overall"]
    assert overall["precision"] == pytest.approx(precision)
    assert overall["recall"] == pytest.approx(recall)
    assert overall["f1"] == pytest.approx(f1) and f1 == pytest.approx(8 / 11)
    assert overall["support"] == 5


def test_partial_type_scores_by_hand():
    gold = [["B-PER", "O", "B-PER", "O", "B-PER"]]  # three PER
    pred = [["B-PER", "O", "B-PER", "I-PER", "O"]]  # PER[0,1) ok, PER[2,4) wrong boundary
    scores = span_scores(gold, pred)
    # tp 1, pred 2, gold 3 -> P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 2/5.
    assert scores["PER"]["precision"] == pytest.approx(1 / 2)
    assert scores["PER"]["recall"] == pytest.approx(1 / 3)
    assert scores["PER"]["f1"] == pytest.approx(2 / 5)
    assert scores["PER"]["support"] == 3


def test_no_entities_anywhere_gives_zeros_not_errors():
    scores = span_scores([["O", "O"]], [["O", "O"]])
    assert scores == {"overall": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}


def test_length_mismatch_names_the_sentence():
    with pytest.raises(ValueError, match="sentence 1"):
        span_scores([["O"], ["O", "B-PER"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 sentences"):
        span_scores([["O"], ["O"]], [["O"]])


def test_bad_tag_is_rejected():
    with pytest.raises(ValueError, match="S-PER"):
        bio_spans(["O", "S-PER"])
