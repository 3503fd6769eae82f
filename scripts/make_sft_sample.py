"""Write the packaged synthetic instruction sample (launcher/samples/sft): small Alpaca-format tasks (reverse,
add, uppercase, opposites, repeat) with exact answers. Free of licence terms, so it ships with the package; the
real runs use Alpaca from ../shared/datasets. Run: python scripts/make_sft_sample.py"""

from __future__ import annotations

import json
import os
import random

WORDS = [
    "apple",
    "river",
    "stone",
    "garden",
    "window",
    "planet",
    "silver",
    "forest",
    "candle",
    "bridge",
    "yellow",
    "market",
    "pencil",
    "rocket",
    "winter",
    "island",
    "butter",
    "doctor",
    "orange",
    "spider",
]
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "old": "new",
    "high": "low",
}


def example(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    word = rng.choice(WORDS)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"The sum is {a + b}."}
    if kind == 2:
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    if kind == 3:
        w = rng.choice(sorted(OPPOSITES))
        return {
            "instruction": f"What is the opposite of '{w}'?",
            "input": "",
            "output": f"The opposite of {w} is {OPPOSITES[w]}.",
        }
    n = rng.randint(2, 4)
    return {
        "instruction": f"Repeat the word {n} times, separated by spaces.",
        "input": word,
        "output": " ".join([word] * n),
    }


def main() -> None:
    rng = random.Random(20261123)
    folder = os.path.join(os.path.dirname(__file__), "..", "launcher", "samples", "sft")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 800), ("test", 100)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
