"""The rule that sets a site's training from its size, the rounds and the budget, and the
accounting of every phase mix it can choose in one accountant."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedseal.common.buckets import size_bucket
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.dp_rule import (
    MAX_BATCH,
    MIN_STEPS_PER_ROUND,
    PROBE_CLIP,
    PROBE_LR,
    SAMPLE_RATE,
    TRAINING_STEPS,
    recipe,
)
from fedseal.common.privacy import epsilon_spent, plan_site


def test_probe_settings_follow_from_size_and_rounds():
    r = recipe(FedConfig(rounds=4), size_bucket(6_000))
    assert (r.mode, r.batch_size, r.steps_per_round) == ("probe", 1_024, TRAINING_STEPS // 3)
    assert (r.lr, r.clip, r.stats_rounds) == (PROBE_LR, PROBE_CLIP, 1)
    assert set(r.source.values()) == {"rule"}
    # a huge site: the expected batch is capped; many rounds: at least a floor of steps
    assert recipe(FedConfig(rounds=4), size_bucket(10**6)).batch_size == MAX_BATCH
    assert recipe(FedConfig(rounds=60), size_bucket(100)).steps_per_round == MIN_STEPS_PER_ROUND
    assert recipe(FedConfig(rounds=2), size_bucket(10)).batch_size == int(SAMPLE_RATE * 8)
    with pytest.raises(ValueError, match="size bucket"):
        recipe(FedConfig(rounds=2), 10)  # an exact count never reaches the rule
    # round 1 is one statistics step, every later round the training steps
    assert [r.steps_in_round(k) for k in (1, 2, 3, 4)] == [1, 100, 100, 100]
    assert r.steps_through(4) == 301 and r.steps_through(1) == 1


def test_every_setting_can_be_overridden_and_says_so():
    cfg = FedConfig(rounds=3, lr=0.5, local_steps=7, batch_size=33, max_grad_norm=2)
    r = recipe(cfg, 512)
    assert (r.lr, r.steps_per_round, r.batch_size, r.clip) == (0.5, 7, 33, 2.0)
    assert set(r.source.values()) == {"set by the user"}
    full = recipe(FedConfig(finetune="full"), 512)
    assert (full.batch_size, full.steps_per_round, full.lr, full.clip, full.stats_rounds) == (
        64,
        20,
        5e-3,
        1.0,
        0,
    )
    # LP-FT: the probe's rounds with the probe's settings, then its adapter rounds
    lpft = recipe(FedConfig(finetune="lora", rounds=3), 512)
    assert (
        lpft.batch_size,
        lpft.steps_per_round,
        lpft.stats_rounds,
        lpft.adapter_from,
        lpft.adapter_steps,
    ) == (128, 300, 1, 3, 24)
    assert [lpft.steps_in_round(k) for k in (1, 2, 3)] == [1, 300, 24]


@pytest.mark.parametrize("value", ["fast", -1, 0, float("nan"), True])
def test_a_bad_override_names_the_setting(value):
    with pytest.raises(ConfigError, match="lr must be 'auto' or a positive number"):
        FedConfig(lr=value)


def test_the_probe_needs_a_statistics_round_and_a_training_round():
    with pytest.raises(ConfigError, match="at least 2 rounds"):
        FedConfig(rounds=1)
    with pytest.raises(ConfigError, match="at least 3 rounds"):
        FedConfig(rounds=2, finetune="lora")  # statistics, head and adapter rounds
    FedConfig(rounds=1, finetune="full")  # one phase: one round is enough


@pytest.mark.parametrize(
    "mode,rounds,n,epsilon",
    [
        *itertools.product(["probe"], [2, 5, 12], [300, 60_000], [1.0, 8.0]),
        ("full", 1, 6_000, 8.0),
        ("full", 4, 300, 1.0),  # LP-FT's two rates: tests/test_lpft.py
    ],
)
def test_the_planned_total_of_every_phase_mix_stays_within_budget(mode, rounds, n, epsilon):
    """Both phases are steps of one mechanism, so the accountant of the whole plan is the
    accountant of its step count; a site that skips rounds takes fewer steps and spends less."""
    r = recipe(FedConfig(finetune=mode, rounds=rounds, epsilon=epsilon), size_bucket(n))
    total = r.steps_through(rounds)
    plan = plan_site(
        size_bucket(n),
        batch_size=r.batch_size,
        steps=total,
        epsilon=epsilon,
        delta=1e-5 / 3,
        accountant="rdp",
    )
    spent = epsilon_spent(plan.noise_multiplier, plan.sample_rate, total, plan.delta, "rdp")
    assert 0.97 * epsilon <= spent <= epsilon
    rounds_of = range(1, rounds + 1)
    for joined in (rounds_of[1:], rounds_of[::2], rounds_of[-1:]):  # sites that skip rounds
        steps = sum(r.steps_in_round(k) for k in joined)
        assert epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, plan.delta, "rdp") <= spent


def test_the_prv_plan_of_the_default_run_is_within_budget():
    r = recipe(FedConfig(), size_bucket(6_735))
    total = r.steps_through(FedConfig().rounds)
    plan = plan_site(size_bucket(6_735), batch_size=r.batch_size, steps=total, epsilon=8.0, delta=1e-5)
    assert 7.9 <= epsilon_spent(plan.noise_multiplier, plan.sample_rate, total, 1e-5) <= 8.0


def test_an_empty_poisson_batch_is_a_noise_only_step():
    """A tiny site samples empty batches often: each still counts as a step and adds noise."""
    from fedseal.client.probe import train_head
    from fedseal.common.privacy import DPPlan

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 2)
            torch.nn.init.zeros_(self.classifier.weight)
            torch.nn.init.zeros_(self.classifier.bias)

        def standardise(self, x):
            return x

    model = Model()
    feats, labels = torch.randn(3, 4), torch.tensor([0, 1, 0])
    r = recipe(FedConfig(rounds=2, local_steps=40, batch_size=1, lr=1.0), size_bucket(3))
    plan = DPPlan(
        noise_multiplier=1.0,
        sample_rate=1 / 3,
        planned_steps=40,
        target_epsilon=8,
        delta=1e-5,
        accountant="rdp",
    )
    torch.manual_seed(0)
    result = train_head(model, feats, labels, r, plan)
    assert result.steps == 40  # (2/3)^3 of the batches are empty: about 12 of 40
    assert model.classifier.weight.abs().sum() > 0
