"""BIO tags (split, repair, check) and entity-level NER scoring the CoNLL way: a predicted entity counts only if
its type and both boundaries match exactly.

Chunking follows conlleval: it tolerates IOB1-style input, so an `I-X` that does not continue an `X` chunk opens one.
"""

from __future__ import annotations

from collections import Counter


def split_bio(tag: str) -> tuple[str, str]:
    """("O", "") for outside, else (prefix, type) for "B-X" / "I-X"."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I") and kind:
        return prefix, kind
    raise ValueError(f"tag {tag!r} is not BIO (expected 'O', 'B-<type>' or 'I-<type>')")


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Chunks of one sentence as (type, start, end_exclusive)."""
    spans: set[tuple[str, int, int]] = set()
    open_type: str | None = None
    open_start = 0
    # A trailing "O" closes whatever chunk is still open at the end of the sentence.
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = split_bio(tag)
        if open_type is not None and (prefix != "I" or kind != open_type):
            spans.add((open_type, open_start, i))
            open_type = None
        # B always opens; I opens when it does not continue a chunk of its own type (conlleval, IOB1-tolerant).
        if prefix == "B" or (prefix == "I" and open_type is None):
            open_type, open_start = kind, i
    return spans


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}


def span_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, dict[str, float]]:
    """Exact-match precision/recall/F1 per entity type plus micro-averaged "overall"; support = gold span count."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    tp: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
        gold_spans, pred_spans = bio_spans(gold_tags), bio_spans(pred_tags)
        n_gold.update(kind for kind, _, _ in gold_spans)
        n_pred.update(kind for kind, _, _ in pred_spans)
        tp.update(kind for kind, _, _ in gold_spans & pred_spans)
    # Types seen only in predictions are listed too: their false positives should be visible per type.
    scores = {kind: _prf(tp[kind], n_pred[kind], n_gold[kind]) for kind in sorted(n_gold.keys() | n_pred.keys())}
    scores["overall"] = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    return scores


def repair_bio(tags: list[str]) -> tuple[list[str], int]:
    """IOB2 form of `tags` and how many changed: an I-X that does not continue an X span becomes B-X.

    CoNLL scoring already reads such an I-X as the start of a span, so spans (and scores) are unchanged; the
    CRF's transition constraints, though, forbid the I-X move, and a gold path through it would cost ~1e4."""
    out, changed, previous = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag, changed = "B-" + tag[2:], changed + 1
        out.append(tag)
        previous = tag
    return out, changed


def check_bio(tags: list[str]) -> str | None:
    """Why `tags` is not a BIO tag set (None when it is)."""
    bad = []
    for tag in tags:
        try:
            split_bio(tag)
        except ValueError:
            bad.append(tag)
    return f"tags {', '.join(bad[:5])} are not BIO (O, B-TYPE, I-TYPE)" if bad else None
