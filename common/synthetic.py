"""The embedded default task: seeded synthetic sentiment sentences.

Each sentence mixes neutral filler with sentiment words; its label is the
polarity of the sentiment words, with a little label noise so the task is
learnable but not trivial. English words, so any English tokenizer splits them
sensibly.
"""

from __future__ import annotations

import numpy as np

from fedseal.common.data import Examples

POSITIVE = (
    "good",
    "great",
    "wonderful",
    "delightful",
    "moving",
    "brilliant",
    "charming",
    "funny",
    "warm",
    "superb",
    "fresh",
    "smart",
    "beautiful",
    "gripping",
    "lovely",
)
NEGATIVE = (
    "bad",
    "dull",
    "boring",
    "awful",
    "tedious",
    "clumsy",
    "flat",
    "messy",
    "weak",
    "stupid",
    "ugly",
    "lifeless",
    "tired",
    "painful",
    "bland",
)
FILLER = (
    "the",
    "film",
    "movie",
    "story",
    "cast",
    "plot",
    "is",
    "was",
    "a",
    "an",
    "and",
    "with",
    "its",
    "this",
    "director",
    "script",
    "scenes",
    "ending",
    "acting",
    "really",
    "quite",
    "rather",
    "at",
    "times",
    "overall",
    "of",
    "in",
    "but",
    "also",
    "music",
)
LABEL_NAMES = ("negative", "positive")


def synthetic_examples(n: int, seed: int, label_noise: float = 0.05) -> Examples:
    """Generate ``n`` labelled sentences, deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(n):
        label = int(rng.integers(2))
        strong = POSITIVE if label else NEGATIVE
        weak = NEGATIVE if label else POSITIVE
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 11))))
        words += list(rng.choice(strong, size=int(rng.integers(1, 3))))
        if rng.random() < 0.3:
            words.append(str(rng.choice(weak)))
        rng.shuffle(words)
        if rng.random() < label_noise:
            label = 1 - label
        texts.append(" ".join(words))
        labels.append(label)
    return Examples(texts, labels, LABEL_NAMES, f"synthetic(n={n}, seed={seed})")
