"""A job's grant (client/budget.py) against real ledger files: the site's total is a budget
over all jobs, in epsilon and in delta; a run asks for a share; the policy caps it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedseal.client import agent, ledger_cli
from fedseal.client.budget import grant
from fedseal.client.ledger import Budget, LedgerError, PrivacyLedger
from fedseal.client.site import SitePolicy
from fedseal.common.config import ConfigError
from fedseal.common.refusals import Code, Refusal

TOTAL = Budget(8.0, 1e-5)
POLICY = SitePolicy()


@pytest.fixture
def ledger(tmp_path) -> PrivacyLedger:
    (tmp_path / "secrets").mkdir()
    return PrivacyLedger.open(
        tmp_path / "ledger.json",
        "alpha",
        TOTAL.epsilon,
        TOTAL.delta,
        key_path=tmp_path / "secrets" / "ledger.key",
    )


def _reopen(led: PrivacyLedger, total: Budget = TOTAL) -> PrivacyLedger:
    return PrivacyLedger.open(led.path, led.site, total.epsilon, total.delta, key_path=led.key_path)


def test_a_server_starting_many_cheap_jobs_is_refused_once_the_next_would_pass(ledger, caplog):
    """Each job asks for epsilon 0.5 and the whole delta 1e-5: sixteen fit, the seventeenth
    is refused, and the deltas granted add up to the total, not to 16e-5."""
    granted = [grant(ledger, f"job-{i}", 0.5, 1e-5, POLICY, TOTAL) for i in range(16)]
    with pytest.raises(Refusal) as refused:
        grant(ledger, "job-16", 0.5, 1e-5, POLICY, TOTAL)
    assert refused.value.refusal_code == Code.BUDGET_EXHAUSTED
    assert refused.value.public == {"asked": 0.5, "remaining": 0.0}
    assert "fedseal ledger raise --ledger " + str(ledger.path) in refused.value.detail
    again = _reopen(ledger)  # what is on disk
    assert len(again.grants) == 16 and again.grant_of("job-16") is None
    assert sum(g.delta for g in again.grants) <= TOTAL.delta
    assert sum(g.delta for g in again.grants) == pytest.approx(TOTAL.delta, rel=1e-9)
    assert sum(g.epsilon for g in granted) <= TOTAL.epsilon
    assert all(g.delta == pytest.approx(TOTAL.delta / 16) for g in granted)


@pytest.mark.parametrize("seed", range(5))
def test_whatever_jobs_come_the_grants_stay_within_the_total(ledger, seed):
    """Jobs of random size (epsilon 0.05 to 3, delta 1e-7 to 1e-5) arrive until one is refused:
    it is refused exactly when it asks for more epsilon than is left, and the grants never
    add up past the total epsilon or delta."""
    rng = random.Random(seed)
    for i in range(500):
        asked = (rng.uniform(0.05, 3.0), 10 ** rng.uniform(-7, -5))
        left = ledger.remaining()
        try:
            got = grant(ledger, f"job-{i}", *asked, POLICY, TOTAL)
        except Refusal as exc:
            assert exc.refusal_code == Code.BUDGET_EXHAUSTED and asked[0] > left.epsilon
            break
        assert got.epsilon == asked[0] and got.delta <= asked[1]
    else:
        pytest.fail("no job was refused")
    assert sum(g.epsilon for g in ledger.grants) <= TOTAL.epsilon
    assert sum(g.delta for g in ledger.grants) <= TOTAL.delta


def test_delta_is_checked_too_after_a_raise_of_epsilon_alone(ledger):
    grant(ledger, "job-a", 8.0, 1e-5, POLICY, TOTAL)
    ledger.raise_total(16.0, 1e-5, "dana", "more epsilon")
    with pytest.raises(Refusal, match="no delta is left") as refused:
        grant(ledger, "job-b", 1.0, 1e-5, POLICY, Budget(16.0, 1e-5))
    assert refused.value.refusal_code == Code.BUDGET_EXHAUSTED
    ledger.raise_total(16.0, 2e-5, "dana", "and delta")
    assert grant(ledger, "job-b", 1.0, 1e-5, POLICY, Budget(16.0, 2e-5)).delta == pytest.approx(1e-5 / 8)


def test_a_run_asking_more_than_the_policy_allows_one_run_is_refused(ledger):
    with pytest.raises(Refusal) as refused:
        grant(ledger, "job-a", 3.0, 1e-5, SitePolicy(max_run_epsilon=2.0), TOTAL)
    assert refused.value.refusal_code == Code.POLICY_RUN_EPSILON
    assert refused.value.public == {"setting": "epsilon", "asked": 3.0, "limit": 2.0}
    assert ledger.grants == () and _reopen(ledger).grants == ()
    assert grant(ledger, "job-a", 2.0, 1e-5, SitePolicy(max_run_epsilon=2.0), TOTAL).epsilon == 2.0


def test_the_grant_is_recorded_before_any_spend_and_never_recomputed(ledger):
    first = grant(ledger, "job-a", 2.0, 1e-5, POLICY, TOTAL)
    assert (first.epsilon, first.delta) == (2.0, pytest.approx(2.5e-6))
    assert _reopen(ledger).grant_of("job-a") == first
    grant(ledger, "job-b", 4.0, 1e-5, POLICY, TOTAL)
    ledger.raise_total(16.0, 1e-4, "dana", "second study")
    # later rounds: the same grant, whatever other jobs and raises did to what is left
    assert grant(ledger, "job-a", 2.0, 1e-5, POLICY, Budget(16.0, 1e-4)) == first
    for asked in ((3.0, 1e-5), (2.0, 1e-6)):
        with pytest.raises(Refusal, match="never recomputed") as refused:
            grant(ledger, "job-a", *asked, POLICY, Budget(16.0, 1e-4))
        assert refused.value.refusal_code == Code.PLAN_CHANGED


def test_a_grant_its_check_refuses_is_not_recorded(ledger):
    def infeasible(epsilon: float, delta: float) -> None:
        raise ValueError(f"no noise level meets epsilon {epsilon}, delta {delta}")

    with pytest.raises(ValueError, match="no noise level meets epsilon 2.0, delta 2.5e-06"):
        grant(ledger, "job-a", 2.0, 1e-5, POLICY, TOTAL, check=infeasible)
    assert ledger.grants == () and ledger.remaining() == TOTAL


def test_a_job_with_spend_but_no_grant_cannot_go_on(ledger):
    led = ledger
    grant(led, "job-a", 2.0, 1e-5, POLICY, TOTAL)
    led.record("job-a", 1, 10, 1.0)
    led.path.with_name("backup").write_bytes(led.path.read_bytes())
    led.record("job-a", 2, 20, 2.0)
    led.path.write_bytes(led.path.with_name("backup").read_bytes())  # an older copy restored
    assert ledger_cli.main(["recover", "--ledger", str(led.path), "--ledger-key", str(led.key_path)]) == 0
    led = _reopen(led)
    [carried] = [j for j in led.jobs() if j.startswith("carried-forward-")]
    with pytest.raises(Refusal, match="no grant.*start a new run") as refused:
        grant(led, carried, 1.0, 1e-5, POLICY, TOTAL)
    assert refused.value.refusal_code == Code.PLAN_CHANGED


def test_without_a_ledger_the_job_gets_the_whole_total():
    """A simulation: the sites' total is the run's own (epsilon, delta)."""
    got = grant(None, "job-a", 8.0, 1e-5, POLICY, TOTAL)
    assert (got.epsilon, got.delta, got.time) == (8.0, 1e-5, "")
    with pytest.raises(Refusal) as refused:
        grant(None, "job-a", 9.0, 1e-5, POLICY, TOTAL)
    assert refused.value.refusal_code == Code.BUDGET_EXHAUSTED


def test_max_run_epsilon_must_be_positive_and_defaults_to_no_cap_below_the_total():
    assert SitePolicy().max_run_epsilon == float("inf")
    with pytest.raises(ConfigError, match="max-run-epsilon must be positive"):
        SitePolicy(max_run_epsilon=0.0)
    values = agent.node_config(
        Path("d"),
        "alpha",
        8.0,
        1e-5,
        Path("l"),
        Path("k"),
        "cpu",
        SitePolicy(),
        None,
        None,
        ("text", "label"),
        reply_hold=0.0,
    )
    assert "max-run-epsilon" not in values  # unset: the total caps a run


def test_the_agent_started_with_another_total_says_to_raise_it(ledger, tmp_path, capsys):
    data = tmp_path / "data.csv"
    data.write_text("text,label\na fine film,positive\n")
    argv = [
        "--server",
        "127.0.0.1:1",
        "--insecure",
        "--data",
        str(data),
        "--ledger",
        str(ledger.path),
        "--ledger-key",
        str(ledger.key_path),
        "--name",
        "alpha",
        "--wait",
        "0",
        "--text-column",
        "text",
        "--labels",
        "positive",
    ]
    assert agent.main([*argv, "--epsilon", "16"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "fedseal ledger raise --ledger" in said and "--epsilon 16 --delta 1e-05" in said
    assert "node config" not in said
    with pytest.raises(LedgerError, match="never lowered"):
        _reopen(ledger, Budget(4.0, 1e-5))
