"""Write the packaged synthetic NER sample (launcher/samples/ner): template sentences with person, organisation
and location names, BIO-tagged. Free of licence terms, so it can ship with the package; the real benchmarks use
CoNLL-2003 from ../shared/datasets. Run: python scripts/make_ner_sample.py"""

from __future__ import annotations

import json
import os
import random

PER = [
    "Anna Berg",
    "Tom Okafor",
    "Li Wei",
    "Maria Santos",
    "John Smith",
    "Priya Nair",
    "Lars Holm",
    "Ema Novak",
    "Kenji Sato",
    "Omar Haddad",
    "Sara Lind",
    "Paul Meyer",
]
ORG = [
    "Acme Corp",
    "United Rail",
    "Northwind Bank",
    "Globex",
    "the Red Cross",
    "Blue Sky Airlines",
    "Delta Foods",
    "Orion Labs",
    "Kappa Media",
    "the City Council",
]
LOC = [
    "Paris",
    "New York",
    "Lagos",
    "Kyoto",
    "Lima",
    "Oslo",
    "Cape Town",
    "Madrid",
    "Cairo",
    "Toronto",
    "South Africa",
    "Brazil",
]
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} .",
    "{ORG} opened an office in {LOC} on Monday .",
    "{PER} said the plan would help {LOC} .",
    "Shares of {ORG} rose after {PER} spoke .",
    "{PER} flew from {LOC} to {LOC} .",
    "The talks between {ORG} and {ORG} ended without a deal .",
    "In {LOC} , {PER} met officials of {ORG} .",
    "Rain delayed the match in {LOC} .",
    "{PER} will lead {ORG} from next year .",
    "Prices fell sharply this week .",
]


def sentence(rng: random.Random) -> dict:
    tokens, tags = [], []
    for piece in rng.choice(TEMPLATES).split():
        if piece.strip("{}") in ("PER", "ORG", "LOC"):
            kind = piece.strip("{}")
            words = rng.choice({"PER": PER, "ORG": ORG, "LOC": LOC}[kind]).split()
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(piece)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    rng = random.Random(20261123)
    folder = os.path.join(os.path.dirname(__file__), "..", "launcher", "samples", "ner")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 600), ("test", 150)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(sentence(rng)) + "\n")


if __name__ == "__main__":
    main()
