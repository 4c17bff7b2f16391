"""The rule that turns a site's size, the rounds and the budget into training settings.

A user gives only their files, the number of sites and a budget; every other
setting is ``auto`` and follows from this rule (any of them can be set by hand:
``--lr``, ``--local-steps``, ``--batch-size``, ``--max-grad-norm``).

**Probe** (``finetune = probe``, the default): the encoder stays as the site
installed it; the federation trains a linear head on pooled sentence features
(see :mod:`fedseal.common.modeling_fedseal`). Round 1 is the *statistics* round: each
site releases the sums of its feature vectors and of its labels, and its count,
with Gaussian noise: one step of the same mechanism as a DP-SGD step (a Poisson sample at the same
rate, each row extended by its label's one-hot vector and a count entry and
scaled to norm 1, the sum plus Gaussian noise of the same multiplier), so both
phases compose in one accountant as plain steps. The server pools them (each
site weighted by its noisy count, see :mod:`fedseal.common.weights`): the
federation's mean feature vector and label proportions over all its examples.
The head's bias becomes the log of those proportions (:func:`prior_bias`) and
stays so: under label skew a bias moved by the sites' updates follows the
one-sided sites (SST-2 over 4 sites, Dirichlet 0.5, ten runs: the first training
round read 0.700 without noise and 0.623 at epsilon 8 with the bias trained,
0.806 and 0.659 with it fixed; docs/benchmarks.md). Rounds 2 and on are
*training* rounds: DP-SGD with momentum on the head's weights over the centred,
scaled features. Where each setting comes from:

* ``sample_rate``: ``SAMPLE_RATE`` (1/4). At a fixed number of steps, the noise
  per example in a DP-SGD step (sigma / expected batch) hardly depends on the
  sampling rate, so a large rate costs little privacy and gives long,
  well-averaged steps; the expected batch is capped at ``MAX_BATCH`` examples to
  bound the work per step on large sites.
* ``steps_per_round``: ``TRAINING_STEPS`` over all training rounds, spread evenly
  (at least ``MIN_STEPS_PER_ROUND`` a round). The head is convex; a few hundred
  noisy steps reach the optimum that the noise allows, and more steps only add
  noise per step at the same budget.
* ``clip``: ``PROBE_CLIP`` (1). The centred, scaled features have unit mean
  squared norm, so a per-example gradient of the cross-entropy on the weights is
  ``|p - y| * |x|``, of order 1 for any encoder and any number of classes.
* ``lr`` and ``momentum``: ``PROBE_LR`` (16) with heavy-ball momentum 0.9 on
  the mean clipped gradient, and the head averaged over the second half of each
  round's steps (iterate averaging takes out most of the noise of the last
  steps). Unit-scale features make one learning rate fit every encoder.
* the noise multiplier is not part of the rule's choices: it is calibrated (in
  :mod:`fedseal.common.privacy`) so the whole planned run, ``steps_through(rounds)``
  steps of both phases, spends the site's epsilon.

**Site size.** Whatever leaves a site (sampling rate, noise multiplier,
steps, epsilon, weight, a refusal) may depend on its example count only through
:func:`~fedseal.common.buckets.size_bucket`, the largest power of two not above it: the server learns
a site's size within a factor of two, never the count (sites of 1,000 and 1,001
examples send the same metadata; ``tests/test_egress.py``). So the rule, the
calibration (:func:`fedseal.common.privacy.plan_site`) and the weights
(:mod:`fedseal.common.weights`) take the bucket, never the count; each checks
that it got one. A batch size the server asks for is a request: the site
samples at ``1 / ceil(bucket / batch)``.

**LoRA** (``finetune = lora``) is LP-FT: the probe's rounds first (the
statistics round, then head rounds, with the probe's settings above), then
adapter rounds: DP-SGD on LoRA adapters in the encoder's top layers and the
head's weights, from the federation's head. The adapter phase's settings, the
split of rounds, steps and budget between the phases, and each choice's source
are in :mod:`fedseal.common.lora_rule`; a ``Recipe`` here carries the adapter
rounds (``adapter_from``, ``adapter_rounds``) and their steps (``adapter_steps``).

**Full** fine-tuning keeps one phase of DP-SGD on every weight with AdamW and
the settings that earlier measurements chose (batch 64, 20 steps a round, lr
5e-3, clip 1.0). Under DP it learned nothing measurable (SST-2: 0.509, the
majority class): it runs, with a warning, and is documented as unsupported
under DP (``docs/lora.md``); use ``lora`` or ``probe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedseal.common.buckets import check_bucket
from fedseal.common.config import AUTO, FedConfig

SAMPLE_RATE = 0.25
MAX_BATCH = 8192
TRAINING_STEPS = 300
MIN_STEPS_PER_ROUND = 20
PROBE_CLIP = 1.0
PROBE_LR = 16.0
PROBE_MOMENTUM = 0.9
FEATURE_MEAN_KEY = "feature_mean"
"""The probe's feature mean: set by the statistics round, never trained."""
HEAD_WEIGHT_KEY = "classifier.weight"
"""The probe's head weights: what its training rounds train."""
PRIOR_KEY = "classifier.bias"
"""The head's bias: a site's label proportions in the statistics round, the log prior after it."""
PRIOR_FLOOR = 0.1
"""A label's pooled proportion counts as at least ``PRIOR_FLOOR / labels`` (:func:`prior_bias`)."""
FULL_UNDER_DP = (
    "finetune=full under DP is not supported: its one phase of DP-SGD on every "
    "weight learned nothing measurable (SST-2: 0.509, the majority class); it runs "
    "as asked, but use --finetune lora (LP-FT) or probe (docs/lora.md)"
)
FINETUNE_SETTINGS = {  # mode: (batch size, steps a round, lr, clip)
    "full": (64, 20, 5e-3, 1.0),
}


@dataclass(frozen=True)
class Recipe:
    """A site's training settings for one run, as the rule (or the user) set them.

    ``stats_rounds`` is 1 when round 1 is the statistics round (probe), else 0;
    ``source`` says, per setting, ``rule`` or ``set by the user``. A step is one
    invocation of the sampled Gaussian mechanism, in either phase.
    """

    mode: str
    batch_size: int
    steps_per_round: int
    lr: float
    momentum: float
    clip: float
    stats_rounds: int
    source: dict[str, str]
    adapter_from: int = 0
    """LP-FT's first adapter round (0: the run has none)."""
    adapter_rounds: int = 0
    adapter_steps: int = 0
    """Steps in each adapter round (:func:`fedseal.common.lora_rule.lora_recipe`)."""

    def is_stats_round(self, server_round: int) -> bool:
        """Whether ``server_round`` is the statistics round."""
        return server_round <= self.stats_rounds

    def is_adapter_round(self, server_round: int) -> bool:
        """Whether ``server_round`` is one of LP-FT's adapter rounds."""
        return 0 < self.adapter_from <= server_round

    def steps_in_round(self, server_round: int) -> int:
        """Steps in round ``server_round`` (1 in the statistics round)."""
        if self.is_stats_round(server_round):
            return 1
        return self.adapter_steps if self.is_adapter_round(server_round) else self.steps_per_round

    def steps_through(self, server_round: int) -> int:
        """Steps in rounds 1 .. ``server_round``: a site's most, if it took part in every one."""
        stats = min(server_round, self.stats_rounds)
        adapter = max(0, server_round - self.adapter_from + 1) if self.adapter_from else 0
        head = max(0, server_round - self.stats_rounds - adapter)
        return stats + head * self.steps_per_round + adapter * self.adapter_steps


def prior_bias(proportions: np.ndarray) -> np.ndarray:
    """The head's bias from the federation's pooled label proportions: their log.

    The pooled proportions are noisy (and a hostile site can push them), so each
    is first clipped to ``[PRIOR_FLOOR / k, 1]`` for ``k`` labels and the whole
    renormalised: no label starts more than ``log(k / PRIOR_FLOOR)`` below another.
    Anything not finite counts as the floor.
    """
    p = np.asarray(proportions, dtype=np.float64)
    floor = PRIOR_FLOOR / p.size
    p = np.clip(np.where(np.isfinite(p), p, floor), floor, 1.0)
    return np.log(p / p.sum()).astype(np.float32)


def adapter_rounds(rounds: int, dp_noise: str) -> int:
    """The adapter rounds of an LP-FT run of ``rounds`` rounds under ``dp_noise`` (the last
    ones; :mod:`fedseal.common.lora_rule`): of the rounds after the statistics round, half
    (rounded down) with each site's own noise, a third (at least one) under the sum's noise."""
    if rounds < 3:
        raise ValueError(f"LP-FT needs at least 3 rounds (statistics, head, adapters), got {rounds}")
    if dp_noise == "distributed":
        return max(1, (rounds - 1) // 3)
    return (rounds - 1) // 2


def stats_rounds(cfg: FedConfig) -> int:
    """Rounds at the start of the run that are statistics rounds (1 for the probe and LP-FT)."""
    return 1 if cfg.finetune in ("probe", "lora") else 0


def _given(value: object) -> bool:
    return value != AUTO


def recipe(cfg: FedConfig, bucket: int) -> Recipe:
    """The settings a site of size bucket ``bucket`` (:func:`~fedseal.common.buckets.size_bucket`) trains with in run ``cfg``.

    Raises
    ------
    ValueError
        If ``bucket`` is not a size bucket.
    """
    num_examples = check_bucket(bucket)
    source: dict[str, str] = {}

    def pick(name: str, rule_value: float) -> float:
        value = getattr(cfg, name)
        source[name] = "set by the user" if _given(value) else "rule"
        return value if _given(value) else rule_value

    if cfg.finetune in ("probe", "lora"):
        adapters = 0
        if cfg.finetune == "lora":
            from fedseal.common.lora_rule import lora_recipe

            adapters = adapter_rounds(cfg.rounds, cfg.dp_noise)
        training_rounds = cfg.rounds - 1 - adapters  # at least 1: FedConfig checks the rounds
        batch = min(MAX_BATCH, max(1, math.ceil(SAMPLE_RATE * num_examples)))
        steps = max(MIN_STEPS_PER_ROUND, math.ceil(TRAINING_STEPS / training_rounds))
        if cfg.dp_noise == "distributed":
            steps = 1  # each round is one DP-SGD step over all sites (client/ddp_round.py)
        return Recipe(
            cfg.finetune,
            int(pick("batch_size", batch)),
            int(pick("local_steps", steps)),
            float(pick("lr", PROBE_LR)),
            PROBE_MOMENTUM,
            float(pick("max_grad_norm", PROBE_CLIP)),
            stats_rounds(cfg),
            source,
            adapter_from=cfg.rounds - adapters + 1 if adapters else 0,
            adapter_rounds=adapters,
            adapter_steps=(lora_recipe(num_examples, adapters).steps_per_round if adapters else 0),
        )
    batch, steps, lr, clip = FINETUNE_SETTINGS[cfg.finetune]
    return Recipe(
        cfg.finetune,
        int(pick("batch_size", batch)),
        int(pick("local_steps", steps)),
        float(pick("lr", lr)),
        0.0,
        float(pick("max_grad_norm", clip)),
        stats_rounds(cfg),
        source,
    )


__all__ = [
    "FEATURE_MEAN_KEY",
    "FULL_UNDER_DP",
    "HEAD_WEIGHT_KEY",
    "PRIOR_FLOOR",
    "PRIOR_KEY",
    "Recipe",
    "prior_bias",
    "recipe",
    "stats_rounds",
]
