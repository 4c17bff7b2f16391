"""A site's accountant history: the phases of one job, each ``(sigma, q, steps)``, composed.

A job whose steps do not all use one noise multiplier and sampling rate (LP-FT:
the probe's statistics and head steps at one rate, the adapter steps at
another; :mod:`fedseal.common.lora_rule`) is accounted as the list of its
phases, exactly as an Opacus accountant's ``history`` holds them: the spend is
the accountant's epsilon of the whole list, not of one ``(sigma, q)`` times the
step count. A job of one phase gives exactly
:func:`epsilon_spent` of it (the same call, cached).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants import create_accountant


@dataclass(frozen=True)
class Phase:
    """``steps`` invocations of the sampled Gaussian mechanism at ``noise_multiplier`` and
    Poisson rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merged(history: Sequence[Phase]) -> list[Phase]:
    """``history`` without empty phases, neighbours of the same ``(sigma, q)`` added up.

    Composition does not depend on how a phase's steps are grouped, so this changes
    no epsilon; it keeps the accountant's history short and a one-phase job one entry.
    """
    out: list[Phase] = []
    for p in history:
        if p.steps <= 0:
            continue
        if out and (out[-1].noise_multiplier, out[-1].sample_rate) == (p.noise_multiplier, p.sample_rate):
            out[-1] = Phase(p.noise_multiplier, p.sample_rate, out[-1].steps + p.steps)
        else:
            out.append(p)
    return out


@lru_cache(maxsize=1024)  # pure; the PRV accountant takes seconds, and sites of one size repeat
def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon after ``steps`` DP-SGD steps (0 for no steps)."""
    if steps <= 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def epsilon_of(history: Sequence[Phase], delta: float, accountant: str = "prv") -> float:
    """Epsilon of every phase of ``history`` composed in one accountant (0 for no steps)."""
    phases = merged(history)
    if not phases:
        return 0.0
    if len(phases) == 1:
        p = phases[0]
        return epsilon_spent(p.noise_multiplier, p.sample_rate, p.steps, delta, accountant)
    acc = create_accountant(accountant)
    acc.history = [(p.noise_multiplier, p.sample_rate, p.steps) for p in phases]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


__all__ = ["Phase", "epsilon_of", "epsilon_spent", "merged"]
