"""Why a site declines a message: one vocabulary of reason codes, shared by sites and server.

A refusal is the one reply a site sends instead of an answer, and it leaves the
site, so it may carry nothing read from the site's files: no example text, no
label, no column name, no path, no count. It is a :class:`Code` plus public
values only (:data:`PUBLIC_VALUES`): the name of the setting involved, the
value the server itself asked for, the site's own policy value, the budget
left (the ledger's arithmetic, never the data's), a round number. The full
explanation, which may name the site's file or what is wrong in it, goes to
the site's own log (:attr:`Refusal.detail`). The server shows the code with
its own fixed description (:data:`DESCRIPTIONS`): never text a site wrote.

Codes are stable strings ``area.what``; renaming one is a wire change (the
known-answer test ``tests/test_egress.py::test_known_refusal_codes_each_with_the_servers_own_words``
fails).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum

from fedseal.common.errors import FedsealError


class Code(StrEnum):
    """Every reason a site declines a message."""

    # The run asks for less than the site's policy allows.
    POLICY_DP = "policy.dp"
    POLICY_SECAGG = "policy.secagg"
    POLICY_UPDATE_CLIP = "policy.update_clip"
    POLICY_COHORT = "policy.cohort"
    POLICY_SECAGG_K = "policy.secagg_k"
    POLICY_SECAGG_THRESHOLD = "policy.secagg_threshold"
    POLICY_COLLUDERS = "policy.colluders"
    POLICY_FEDERATED_EVAL = "policy.federated_eval"
    POLICY_MODEL = "policy.model"
    POLICY_LABELS = "policy.labels"
    POLICY_RUN_EPSILON = "policy.run_epsilon"
    POLICY_SIZE = "policy.size"
    POLICY_NOISE_SHARE = "policy.noise_share"
    POLICY_TIMEOUT = "policy.timeout"
    # The site's privacy budget.
    BUDGET_EXHAUSTED = "budget.exhausted"
    BUDGET_ROUND = "budget.round"
    PLAN_INFEASIBLE = "plan.infeasible"
    PLAN_CHANGED = "plan.changed"
    # What a site does at most once per round.
    ROUND_SENT = "round.sent"
    ROUND_NOT_TRAINED = "round.not_trained"
    ROUND_EVALUATED = "round.evaluated"
    ROUND_UNMASKED = "round.unmasked"
    # The server's message itself.
    MESSAGE_CONFIG = "message.config"
    MESSAGE_ROUND = "message.round"
    MESSAGE_WEIGHTS = "message.weights"
    MESSAGE_SECAGG = "message.secagg"
    MESSAGE_STAGE = "message.stage"
    MESSAGE_DDP = "message.ddp"
    # The site's own state.
    SITE_DATA = "site.data"
    SITE_LEDGER = "site.ledger"
    SITE_RECORD = "site.record"
    SITE_KEYS = "site.keys"
    SITE_MODEL = "site.model"
    SITE_CODE = "site.code"
    SITE_CONFIG = "site.config"
    SITE_INTERNAL = "site.internal"
    # Training.
    TRAIN_DIVERGED = "train.diverged"


DESCRIPTIONS: Mapping[Code, str] = {
    Code.POLICY_DP: "the site requires differential privacy; run with dp on",
    Code.POLICY_SECAGG: "the site requires secure aggregation; run with secagg on",
    Code.POLICY_UPDATE_CLIP: "update-clip is above the site's max-update-clip; lower it",
    Code.POLICY_COHORT: "the cohort (clients, min-clients or this round's sites) is below the "
    "site's min-cohort; add sites or raise clients and min-clients",
    Code.POLICY_SECAGG_K: "SecAgg+ k is below the site's min-secagg-k; raise secagg-k",
    Code.POLICY_SECAGG_THRESHOLD: "the SecAgg+ threshold is below the site's "
    "min-secagg-threshold; raise secagg-threshold",
    Code.POLICY_COLLUDERS: "this round's SecAgg+ k and threshold do not withstand the site's "
    "max-colluders; raise secagg-threshold (and secagg-k)",
    Code.POLICY_FEDERATED_EVAL: "the site does not answer federated evaluation (its federated-eval is off)",
    Code.POLICY_MODEL: "the site does not run this model (not in its --allow-model list)",
    Code.POLICY_LABELS: "the run's labels are not the label set the site declared",
    Code.POLICY_RUN_EPSILON: "the run asks for more epsilon than the site grants one run "
    "(its --max-run-epsilon); lower epsilon",
    Code.POLICY_SIZE: "a size the run asks for (max-length, lora-r, local-steps, batch-size, "
    "eval-batch-size) is beyond what the site runs; lower it",
    Code.POLICY_NOISE_SHARE: "under --dp-noise distributed, this round's noise share (or its "
    "cohort) is too small for the site's min-cohort and "
    "max-colluders; raise min-clients or lower max-colluders",
    Code.POLICY_TIMEOUT: "the run's timeout is below two of the site's reply holds, so its "
    "replies would likely arrive after the server stopped waiting; raise timeout to the limit, "
    "or the site lowers its --reply-hold",
    Code.BUDGET_EXHAUSTED: "the site's privacy budget left cannot cover this run; lower "
    "epsilon, or the site operator raises its total (fedseal ledger raise)",
    Code.BUDGET_ROUND: "this round would spend more than the run's grant at this site",
    Code.PLAN_INFEASIBLE: "no noise level meets this run's epsilon, delta, rounds and batch at "
    "this site; raise epsilon, lower delta or the batch size",
    Code.PLAN_CHANGED: "the run's rounds, steps or batch changed after it started; start a new run",
    Code.ROUND_SENT: "the site sent this round before and never trains it again",
    Code.ROUND_NOT_TRAINED: "the site scores only rounds it trained in",
    Code.ROUND_EVALUATED: "the site answers one evaluation per round",
    Code.ROUND_UNMASKED: "the site helps unmask one aggregate per round",
    Code.MESSAGE_CONFIG: "the server's run config is invalid (see setting)",
    Code.MESSAGE_ROUND: "the server's round number is not one",
    Code.MESSAGE_WEIGHTS: "the server's weights do not fit the site's model",
    Code.MESSAGE_SECAGG: "the server's secure-aggregation parameters are missing, malformed, "
    "for another round, or leave this site out",
    Code.MESSAGE_STAGE: "a secure-aggregation stage message is malformed, stale or out of order",
    Code.MESSAGE_DDP: "the server's distributed-noise encoding is missing, malformed or does "
    "not fit this round",
    Code.SITE_DATA: "the site's data cannot be used; the site operator sees why in its log",
    Code.SITE_LEDGER: "the site's privacy ledger cannot be read or written; the site operator "
    "sees why in its log",
    Code.SITE_RECORD: "the site's record of once-per-round actions cannot be read or written",
    Code.SITE_KEYS: "the site's signing key or roster cannot be read",
    Code.SITE_MODEL: "the site cannot load this model",
    Code.SITE_CODE: "the site runs only the fedseal it installed; this run's code differs",
    Code.SITE_CONFIG: "the site's own settings are invalid; the site operator sees why in its log",
    Code.SITE_INTERNAL: "an unexpected error at the site; the site operator sees it in its log",
    Code.TRAIN_DIVERGED: "local training diverged (NaN or infinity); lower lr or max-grad-norm",
}

PUBLIC_VALUES = ("setting", "asked", "limit", "remaining", "round")
"""The only values a refusal may carry beside its code:

``setting``
    the name of the run setting or policy flag involved: a word of lower-case
    letters, digits and dashes (:data:`SETTING_PATTERN`);
``asked``
    the number (or flag) the server itself sent for it;
``limit``
    the site's own policy value for it (the site operator's choice);
``remaining``
    the epsilon the site has left for runs (the ledger's arithmetic);
``round``
    the round the refusal is about.

Only ``setting`` is text, and only a setting's name: no other text, not even
one the server sent (a refusal that echoed a server-chosen string could carry
back whatever the server planted in it, or whatever a site put there).
"""
SETTING_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
"""What a refusal's ``setting`` may look like."""

Public = str | int | float | bool


class Refusal(FedsealError):
    """The site declines a message: ``code`` and public values leave, ``detail`` stays.

    Parameters
    ----------
    code
        Why, as a :class:`Code`.
    detail
        The full explanation for the site's own log; it may name the site's file
        or what is wrong in it, so it never leaves the site.
    **public
        Values from :data:`PUBLIC_VALUES` only (see there for what each may hold).

    Raises
    ------
    ValueError
        If a value is not one of :data:`PUBLIC_VALUES`, or not a finite scalar.
    """

    def __init__(self, code: Code, detail: str = "", **public: Public) -> None:
        self.refusal_code = Code(code)
        self.detail = detail or DESCRIPTIONS[self.refusal_code]
        self.public = public_values(public)
        super().__init__(f"{self.refusal_code}: {self.detail}")

    @property
    def code(self) -> str:  # type: ignore[override]
        """The stable code of this refusal."""
        return str(self.refusal_code)


class UnheldRefusal(Refusal):
    """A refusal that leaves at once, not after the site's reply hold.

    Raise it only from a check that runs before the handler reads anything of the
    site's (data, model, ledger): its timing then says nothing about the data. Today
    only :func:`fedseal.client.policy.check_hold` raises it; the same code raised as
    a plain :class:`Refusal` is held like any other.
    """


def public_values(values: Mapping[str, object]) -> dict[str, Public]:
    """``values`` checked to be :data:`PUBLIC_VALUES`: a setting's name, finite numbers or flags.

    Raises
    ------
    ValueError
        If a name is not a public value's, ``setting`` is not a setting's name,
        or another value is not a finite number or a flag.
    """
    out: dict[str, Public] = {}
    for name, value in values.items():
        if name not in PUBLIC_VALUES:
            raise ValueError(f"a refusal carries only {PUBLIC_VALUES}, not {name!r}")
        if name == "setting":
            if not isinstance(value, str) or not SETTING_PATTERN.fullmatch(value):
                raise ValueError(f"a refusal's setting must be a setting's name, not {value!r}")
            out[name] = value
        elif isinstance(value, bool) or isinstance(value, int):
            out[name] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[name] = value
        else:
            raise ValueError(
                f"refusal value {name!r} must be a finite number or a flag, not {type(value).__name__}"
            )
    return out


def describe(code: str, values: Mapping[str, Public]) -> str:
    """The server's own text for a refusal: its description and its public values."""
    try:
        text = DESCRIPTIONS[Code(code)]
    except ValueError:
        text = "unknown refusal code"
    extra = ", ".join(f"{k} {values[k]}" for k in PUBLIC_VALUES if k in values)
    return f"{code}: {text}" + (f" ({extra})" if extra else "")


__all__ = [
    "Code",
    "DESCRIPTIONS",
    "PUBLIC_VALUES",
    "SETTING_PATTERN",
    "Public",
    "Refusal",
    "describe",
    "public_values",
]
