"""A seeded six-class topic task, for checking the defaults on more than two classes.

No multi-class text data set is on this machine, and nothing may be downloaded,
so this writes one: each sentence mixes filler with one or two words of its
topic and, half the time, one word of another topic; 5% of the labels are
flipped. Usage (then run ``fedseal simulate --train <out>/train.jsonl --eval
<out>/dev.jsonl ...``)::

    python -m simulations.bench.topics --out bench-out/topics --train 6000 --dev 600
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedseal.common.data import Examples, write_examples

TOPICS = {
    "sport": ("goal", "match", "striker", "tennis", "league", "coach", "stadium", "referee"),
    "politics": ("election", "senate", "minister", "vote", "parliament", "policy", "campaign", "law"),
    "science": ("experiment", "molecule", "telescope", "physics", "laboratory", "genome", "theory", "data"),
    "food": ("recipe", "bread", "cheese", "spicy", "dessert", "kitchen", "soup", "flavour"),
    "travel": ("flight", "hotel", "beach", "passport", "tourist", "island", "luggage", "journey"),
    "music": ("guitar", "album", "concert", "melody", "drummer", "song", "orchestra", "lyrics"),
}
FILLER = (
    "the",
    "a",
    "was",
    "is",
    "and",
    "with",
    "this",
    "that",
    "of",
    "in",
    "we",
    "they",
    "new",
    "about",
    "after",
    "today",
    "really",
    "some",
    "report",
    "people",
    "week",
)


def topic_examples(n: int, seed: int, label_noise: float = 0.05) -> Examples:
    """``n`` labelled sentences, deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    names = tuple(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 10))))
        words += list(rng.choice(TOPICS[names[label]], size=int(rng.integers(1, 3))))
        if rng.random() < 0.5:
            other = names[(label + int(rng.integers(1, len(names)))) % len(names)]
            words.append(str(rng.choice(TOPICS[other])))
        rng.shuffle(words)
        if rng.random() < label_noise:
            label = int(rng.integers(len(names)))
        texts.append(" ".join(words))
        labels.append(label)
    return Examples(texts, labels, names, f"topics(seed={seed})")


def main(argv: list[str] | None = None) -> None:
    """Write ``train.jsonl`` and ``dev.jsonl`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--dev", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_examples(topic_examples(args.train, args.seed), args.out / "train.jsonl")
    write_examples(topic_examples(args.dev, args.seed + 1), args.out / "dev.jsonl")


if __name__ == "__main__":
    main()
