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
* under the sum's noise (``dp-noise = distributed``) the sites send clipped
  gradient sums and the *server* steps: DP-AdamBC
  (:class:`fedseal.server.ddp_round.DistributedOptimiser`) with Adam's default
  betas (:data:`DISTRIBUTED_BETAS`, Kingma and Ba 2015), at
  :data:`DISTRIBUTED_LR` decayed linearly to ``1/A`` of it over the ``A``
  adapter rounds (the usual fine-tuning schedule: Hu et al. 2021, Li et al.
  2022), on gradients clipped to :data:`DISTRIBUTED_CLIP`. There the noise on a
  step's mean gradient is small (the federation's sample, 16,800 records at full
  SST-2) and known exactly, and without privacy the same adapters pass 0.85 with
  Adam where the heavy-ball rule gained nothing (``docs/lora.md``, the ceiling).
  The clip is 1, not 0.1: Adam's step does not depend on the clip's overall
  scale, only on how it weighs records, and 0.1 (below nearly every record's
  norm: a median of 0.37 on the adapters) weighs every record alike, so the
  many records the head already fits push their margins up: at full SST-2
  (epsilon 8) the held-out loss doubled within 34 steps (0.41 to 0.81) and the
  accuracy fell (0.810 to 0.798), where a clip of 1 (between the adapters'
  median and 90th percentile) gained 1.1 points over 50 steps (0.810 to 0.821)
  with the held-out loss rising more slowly (0.40 to 0.72); the decay is there
  to slow that late rise (``docs/lora.md``). The rate:
  the ceiling's 2e-3 halved (clipped, 2e-3 was rough even without noise), the
  best of 3e-4, 1e-3 and 3e-3 on a 4-site slice (``docs/lora.md``).
* the budget split (:func:`calibrate`): one noise multiplier for every phase, or
  the adapter phase's at ``ratio`` times the probe's.

**How a run splits its rounds, steps and budget between the phases** (:func:`fedseal.common.dp_rule.adapter_rounds`,
:func:`plan_lpft`):

* rounds: round 1 is the probe's statistics round; with each site's own noise
  the first half of the remaining rounds (rounded up) are the probe's head
  rounds, the rest (at least one) adapter rounds. LP-FT moves the features only
  once the head fits them (Kumar et al. 2022: fine-tuning under a head that
  does not fit distorts the features; it then never starts worse than the
  probe), and the head is convex: its :data:`~fedseal.common.dp_rule.TRAINING_STEPS`
  noisy steps reach the optimum the noise allows in any number of rounds, so
  it needs rounds only to average the sites. Under the sum's noise a round is
  one step, so the head's rounds are its steps: there two thirds of the
  remaining rounds are head rounds and a third (at least one) adapter rounds.
  At full SST-2 (epsilon 8) the probe's head reads about 0.81 after 50 steps
  and 0.82 after 100, and the adapters' 50 steps gain about half a point
  either way, so 100 head steps then 50 adapter steps ended at the probe's
  level where 50 and 50 ended below it (``docs/lora.md``).
* steps: the probe keeps its statistics step and head steps; the adapter phase
  takes :data:`STEPS` steps in all (few long steps of large batches: Li et al. 2022).
* budget: one accountant over all phases, calibrated so that every planned step
  of both (and one evaluation step per round where evaluation is planned, at the
  probe's rate) spends the job's grant, with one noise multiplier for both
  phases (``ratio = 1``). So each phase's share of epsilon follows its steps and
  its rate: the adapter phase's 24 steps at a rate of about 1,024 examples raise
  the probe's multiplier only slightly (one SST-2 site at epsilon 8: 2.74 to 2.78),
  so the probe loses almost nothing to them. A lower multiplier for the adapters
  (``ratio < 1``) would buy adapter steps with probe noise; that pays only where
  the adapters gain, and without noise they gained at most a point
  (``docs/lora.md``), so the rule does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedseal.common.phases import Phase, epsilon_of
from fedseal.common.privacy import DPPlan, PrivacyError, check_delta, sample_rate_for

if TYPE_CHECKING:
    from fedseal.common.dp_rule import Recipe

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
DISTRIBUTED_CLIP = 1.0
"""The per-record clip of an adapter round under the sum's noise (``dp-noise = distributed``)."""
DISTRIBUTED_LR = 1e-3
"""The server's DP-AdamBC rate at the first adapter round under the sum's noise (then linear decay)."""
DISTRIBUTED_BETAS = (0.9, 0.999)
MAX_TOKENS = 8192
"""Padded tokens per chunk of a step (length-sorted; bounds the per-example gradients' memory)."""


@dataclass(frozen=True)
class LoraRecipe:
    """Settings of the adapter phase at one site (see the module docstring for each)."""

    layers: int = LAYERS
    rank: int = RANK
    alpha: int = ALPHA
    targets: tuple[str, ...] = TARGETS
    sample_rate: float = MAX_SAMPLE_RATE
    expected_batch: float = EXPECTED_BATCH
    """The Poisson batch's mean size at the site's size bucket: a step divides its noisy sum by it."""
    steps_per_round: int = STEPS
    clip: float = CLIP
    lr: float = LR
    momentum: float = MOMENTUM
    max_tokens: int = MAX_TOKENS
    optimizer: str = "sgd"
    floor: float = 1e-16
    """DP-AdamBC's floor under the corrected second moment (``optimizer = "adam_bc"`` only)."""


def sample_rate(bucket: int, expected_batch: int = EXPECTED_BATCH) -> float:
    """The adapter phase's sampling rate at size bucket ``bucket``: about ``expected_batch``
    examples, at most 1/4 of the site (:func:`fedseal.common.privacy.sample_rate_for`)."""
    return min(MAX_SAMPLE_RATE, sample_rate_for(bucket, expected_batch))


def lora_recipe(bucket: int, rounds: int, **overrides: float) -> LoraRecipe:
    """The adapter phase's recipe for a site of size bucket ``bucket`` over ``rounds`` rounds.

    :data:`STEPS` steps spread evenly over the rounds (at least one a round); the
    rate and the expected batch follow the bucket, never the exact count (what
    leaves the site depends on its size only through the bucket);
    ``overrides`` set any field by hand.
    """
    if rounds < 1:
        raise ValueError(f"the adapter phase needs at least one round, got {rounds}")
    q = float(overrides.pop("sample_rate", sample_rate(bucket)))
    settings: dict[str, Any] = {
        "sample_rate": q,
        "expected_batch": q * bucket,
        "steps_per_round": max(1, math.ceil(STEPS / rounds)),
    }
    settings.update(overrides)
    return LoraRecipe(**settings)


@lru_cache(maxsize=256)
def calibrate(
    probe_rate: float,
    probe_steps: int,
    lora_rate: float,
    lora_steps: int,
    epsilon: float,
    delta: float,
    accountant: str = "prv",
    ratio: float = 1.0,
) -> tuple[Phase, Phase]:
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
        return epsilon_of(
            [Phase(sigma, probe_rate, probe_steps), Phase(sigma * ratio, lora_rate, lora_steps)],
            delta,
            accountant,
        )

    low, high = 0.1, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1000:
            raise PrivacyError(
                f"epsilon {epsilon} at delta {delta} cannot cover {probe_steps} "
                f"probe and {lora_steps} adapter steps"
            )
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return Phase(high, probe_rate, probe_steps), Phase(high * ratio, lora_rate, lora_steps)


def plan_lpft(
    bucket: int, rec: Recipe, probe_steps: int, epsilon: float, delta: float, accountant: str = "prv"
) -> DPPlan:
    """An LP-FT job's plan: both phases' noise, calibrated so that all planned steps spend ``epsilon``.

    ``rec`` is the run's recipe (:func:`fedseal.common.dp_rule.recipe`);
    ``probe_steps`` every step planned at the probe's rate (statistics, head and
    evaluation steps); the adapter phase's are ``rec.adapter_steps`` in each of
    its rounds. The plan's own ``(noise_multiplier, sample_rate)`` are the
    probe's; ``plan.adapter`` the adapter phase's.

    Raises
    ------
    PrivacyError
        If delta is not below ``1 / (2 * bucket)`` or no noise meets the budget.
    """
    check_delta(bucket, delta)
    probe_rate = sample_rate_for(bucket, rec.batch_size)
    lora_steps = rec.adapter_steps * rec.adapter_rounds
    probe, adapter = calibrate(
        probe_rate, probe_steps, sample_rate(bucket), lora_steps, epsilon, delta, accountant
    )
    return DPPlan(
        probe.noise_multiplier,
        probe_rate,
        probe_steps + lora_steps,
        epsilon,
        delta,
        accountant,
        adapter=adapter,
    )


def round_phase(plan: DPPlan, rec: Recipe, server_round: int | None, steps: int) -> Phase:
    """The ``steps`` a site takes in ``server_round`` (None: an evaluation step), as a phase.

    An adapter round of an LP-FT plan steps at the adapter phase's ``(sigma, q)``;
    every other step (statistics, head, evaluation) at the plan's own.
    """
    if plan.adapter is not None and server_round is not None and rec.is_adapter_round(server_round):
        return Phase(plan.adapter.noise_multiplier, plan.adapter.sample_rate, steps)
    return Phase(plan.noise_multiplier, plan.sample_rate, steps)


__all__ = [
    "LoraRecipe",
    "Phase",
    "calibrate",
    "epsilon_of",
    "lora_recipe",
    "plan_lpft",
    "round_phase",
    "sample_rate",
]
