"""The adapter phase of LP-FT: its settings, and the budget it shares with the probe's phases.

A run with ``finetune = lora`` is, per site, three phases of the sampled
Gaussian mechanism: the probe's statistics step and DP head steps
(:mod:`fedseal.common.dp_rule`), then DP-SGD steps on LoRA adapters in the top
layers plus the head's weights (:mod:`fedseal.client.lora_round`). Each phase is
a :class:`Phase` ``(noise multiplier, sampling rate, steps)``; the site's spend is
the accountant's epsilon of the whole list (an Opacus accountant's history holds
exactly such triples), not of one ``(sigma, q)`` times the step count.

Where each setting of the adapter phase comes from (measured on cached states in
``docs/lora.md``; none is read off one data set's accuracy alone):

* ``layers`` (:data:`LAYERS`), ``rank``, ``alpha``, ``targets``: LoRA of rank 8,
  alpha 16 on the query and value projections (Hu et al. 2021, the setting of their
  GLUE runs; Yu et al. 2022 use the same under DP) of the top two layers only:
  the frozen layers below are computed once (:mod:`fedseal.common.hidden_cache`),
  so a step costs the top layers alone, and fewer trained coordinates means less
  noise in total.
* ``expected batch`` (:data:`EXPECTED_BATCH`, at most ``MAX_SAMPLE_RATE`` of the
  site): large Poisson batches and few steps (Li et al. 2022, "Large Language
  Models Can Be Strong Differentially Private Learners": the noise in a step
  falls as ``sigma / B``, and batches of 1,000-2,000 worked across tasks).
* ``steps`` (:data:`STEPS`, over all adapter rounds): few long steps (same source).
* ``clip`` (:data:`CLIP`): below nearly every per-example gradient norm (at the
  probe's head on SST-2, one site: adapters' median 0.61, 90th percentile 3.9;
  the head's median 0.13), so the step is the mean of normalised gradients (Li et
  al. 2022 found small clipping norms best); the learning rate then sets the
  step's length alone.
* ``lr`` (:data:`LR`) with heavy-ball momentum :data:`MOMENTUM` on the noisy mean
  gradient: the largest measured rate that does not raise the training loss
  without noise (one SST-2 site, 24 steps: 0.05 to 0.2 left it within 0.004, 0.5
  raised it from 0.254 to 0.299; ``docs/lora.md``). SGD does not normalise each
  coordinate by its own noise level (plain DP-Adam turns noise into full-size
  steps: Tang et al. 2024, "DP-AdamBC"); ``optimizer = "adam_bc"`` is that paper's
  bias-corrected Adam (:mod:`fedseal.client.dp_adam_bc`), measured no better here
  (without noise, Adam at 3e-4 did not lower the training loss and 1e-3 raised it).
* the budget split (:func:`calibrate`): one noise multiplier for every phase, or
  the adapter phase's at ``ratio`` times the probe's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from opacus.accountants import create_accountant

from fedseal.common.privacy import PrivacyError

LAYERS = 2
RANK = 8
ALPHA = 16
TARGETS = ("query", "value")
EXPECTED_BATCH = 1024
MAX_SAMPLE_RATE = 0.25
STEPS = 24
CLIP = 0.1
LR = 0.1
MOMENTUM = 0.9
MAX_TOKENS = 8192
"""Padded tokens per chunk of a step (length-sorted; bounds the per-example gradients' memory)."""


@dataclass(frozen=True)
class Phase:
    """One phase of a site's DP-SGD: ``steps`` invocations of the sampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class LoraRecipe:
    """Settings of the adapter phase at one site (see the module docstring for each)."""

    layers: int = LAYERS
    rank: int = RANK
    alpha: int = ALPHA
    targets: tuple[str, ...] = TARGETS
    sample_rate: float = MAX_SAMPLE_RATE
    steps_per_round: int = STEPS
    clip: float = CLIP
    lr: float = LR
    momentum: float = MOMENTUM
    max_tokens: int = MAX_TOKENS
    optimizer: str = "sgd"
    floor: float = 1e-16
    """DP-AdamBC's floor under the corrected second moment (``optimizer = "adam_bc"`` only)."""

    def expected_batch(self, num_examples: int) -> float:
        """Mean size of a Poisson batch at this site."""
        return self.sample_rate * num_examples


def sample_rate(num_examples: int, expected_batch: int = EXPECTED_BATCH) -> float:
    """The adapter phase's sampling rate: ``expected_batch`` examples, at most 1/4 of the site."""
    if num_examples < 1:
        raise PrivacyError("a site with no examples cannot train")
    return min(MAX_SAMPLE_RATE, expected_batch / num_examples)


def lora_recipe(num_examples: int, rounds: int, **overrides: float) -> LoraRecipe:
    """The adapter phase's recipe for a site of ``num_examples`` over ``rounds`` adapter rounds.

    :data:`STEPS` steps spread evenly over the rounds (at least one a round);
    ``overrides`` set any field by hand.
    """
    if rounds < 1:
        raise ValueError(f"the adapter phase needs at least one round, got {rounds}")
    settings = {"sample_rate": sample_rate(num_examples),
                "steps_per_round": max(1, math.ceil(STEPS / rounds))}
    settings.update(overrides)
    return LoraRecipe(**settings)


def epsilon_of(phases: Sequence[Phase], delta: float, accountant: str = "prv") -> float:
    """Epsilon of all ``phases`` composed in one accountant (0 for no steps)."""
    history = [(p.noise_multiplier, p.sample_rate, p.steps) for p in phases if p.steps > 0]
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate(probe_rate: float, probe_steps: int, lora_rate: float, lora_steps: int,
              epsilon: float, delta: float, accountant: str = "prv",
              ratio: float = 1.0) -> tuple[Phase, Phase]:
    """The probe's and the adapter phase's noise so that both together spend ``epsilon``.

    The adapter phase's multiplier is ``ratio`` times the probe's; the probe's is
    the smallest (bisection on the accountant, 0.5% tolerance, rounded up) whose
    composition stays within ``epsilon``.

    Raises
    ------
    PrivacyError
        If no multiplier up to 1,000 meets the budget.
    """
    def spent(sigma: float) -> float:
        return epsilon_of([Phase(sigma, probe_rate, probe_steps),
                           Phase(sigma * ratio, lora_rate, lora_steps)], delta, accountant)

    low, high = 0.1, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1000:
            raise PrivacyError(f"epsilon {epsilon} at delta {delta} cannot cover {probe_steps} "
                               f"probe and {lora_steps} adapter steps")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return Phase(high, probe_rate, probe_steps), Phase(high * ratio, lora_rate, lora_steps)


__all__ = ["LoraRecipe", "Phase", "calibrate", "epsilon_of", "lora_recipe", "sample_rate"]
