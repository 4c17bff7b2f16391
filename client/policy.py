"""The site's policy, enforced: what a run must promise before this site trains or evaluates.

The server's config arrives with every message and is written by an
adversary as far as the site is concerned. :func:`check_train` compares it
with the site's own :class:`~fedseal.client.site.SitePolicy` (from its node config,
set by ``fedseal client`` flags) *before* any model is built or any record
is read, and raises :class:`~fedseal.common.refusals.Refusal` naming the setting the server
must change. :func:`check_evaluate` does the same for federated evaluation.

What is checked, and why:

``dp``
    a run without differential privacy trains without noise and records
    nothing in the ledger: refused when the site requires DP;
``secagg``
    a run without secure aggregation sends the raw update: refused when the
    site requires it;
cohort, ``clients``, ``min-clients``
    a secure round's sum over few sites says too much about each one; the
    round's actual cohort (the node list of the SecAgg+ parameters), the run's
    ``clients`` and its ``min-clients`` must all reach ``min-cohort``;
``secagg-k``, ``secagg-threshold``
    fewer neighbours or a lower threshold than the site accepts weakens the
    collusion bound; both the run's settings (unless auto) and the round's
    actual ``k`` and ``t`` are checked;
``max-colluders``
    the server with ``2t - k - 1`` colluding sites of one neighbourhood can get
    two views signed there and unmask a site, and ``t - 1`` colluding neighbours
    plus the site's own share rebuild its self-mask: the round's actual ``k``
    (its neighbour count, at most cohort - 1) and ``t`` must give ``2t - k - 1``
    and ``t - 1`` both above the site's ``max-colluders``;
``update-clip``
    no larger than ``max-update-clip``;
``model``
    one of the site's ``allow-model`` entries, compared as text before any file
    is touched (a server cannot learn which paths exist at the site);
``labels``
    the label set the site declared (a refusal says only that the sets differ);
sizes
    ``max-length``, ``lora-r``, ``local-steps``, ``batch-size`` and
    ``eval-batch-size`` within :data:`SIZE_LIMITS` (an absurd size would
    exhaust the site's memory or time);
``timeout``
    at least two of the site's ``reply-hold`` (:func:`check_hold`): a held reply
    that arrives after the server stopped waiting would have spent budget for nothing.

Every refusal is a :class:`~fedseal.common.refusals.Refusal`: a code, the
setting, the value the server asked for and the site's own limit, nothing
read from the site's files.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedseal.client.site import SitePolicy
from fedseal.common.config import AUTO, FedConfig
from fedseal.common.refusals import Code, Public, Refusal, UnheldRefusal
from fedseal.common.secagg_wire import WireError, unpack_ids

# The node-config flag that lowers each minimum, named in every refusal's detail.
_FLAG = {
    "dp": "require-dp",
    "secagg": "require-secagg",
    "cohort": "min-cohort",
    "k": "min-secagg-k",
    "threshold": "min-secagg-threshold",
    "clip": "max-update-clip",
    "colluders": "max-colluders",
    "eval": "federated-eval",
    "model": "allow-model",
    "labels": "labels",
}
SIZE_LIMITS = {
    "max_length": 512,
    "lora_r": 256,
    "local_steps": 10_000,
    "batch_size": 1 << 20,
    "eval_batch_size": 4096,
}
"""The largest sizes a site runs, whatever the server asks (memory and time, not privacy)."""


def _refuse(code: Code, setting: str, asked: Public, limit: Public, flag: str) -> Refusal:
    return Refusal(
        code,
        f"the run's {setting} = {asked} is below this site's policy ({flag} = {limit}); "
        f"the server must change {setting}, or the site operator its {flag} flag",
        setting=setting,
        asked=asked,
        limit=limit,
    )


def _round_parameters(secagg: Mapping[str, object] | None) -> tuple[int, int, int] | None:
    """``(cohort, k, threshold)`` of the round's SecAgg+ parameters, if the message has them."""
    if secagg is None:
        return None
    try:
        cohort = len(unpack_ids(secagg["nodes"]))  # type: ignore[arg-type]
        return cohort, int(secagg["k"]), int(secagg["threshold"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError, WireError):
        raise Refusal(
            Code.MESSAGE_SECAGG,
            "the server's secure-aggregation parameters (nodes, k, threshold) are missing or malformed",
        ) from None


def check_train(policy: SitePolicy, cfg: FedConfig, secagg: Mapping[str, object] | None) -> None:
    """Refuse a ``train`` message whose run or round asks for less than ``policy``.

    Parameters
    ----------
    policy
        The site's own policy.
    cfg
        The run's config, as the server sent it.
    secagg
        The ``secagg`` record of the message (SecAgg+ parameters of this
        round), or None when the message has none.

    Raises
    ------
    fedseal.common.refusals.Refusal
        Naming the first setting that falls short.
    """
    check_run(policy, cfg)
    if policy.require_dp and not cfg.dp:
        raise _refuse(Code.POLICY_DP, "dp", False, True, _FLAG["dp"])
    if policy.require_secagg and not cfg.secagg:
        raise _refuse(Code.POLICY_SECAGG, "secagg", False, True, _FLAG["secagg"])
    if cfg.update_clip > policy.max_update_clip:
        raise Refusal(
            Code.POLICY_UPDATE_CLIP,
            f"the run's update-clip = {cfg.update_clip} is above this site's policy "
            f"({_FLAG['clip']} = {policy.max_update_clip}); the server must lower update-clip",
            setting="update-clip",
            asked=cfg.update_clip,
            limit=policy.max_update_clip,
        )
    if not cfg.secagg:
        return  # a plain round: the site agreed to show its (DP) update; no sum to protect
    cohort_code = Code.POLICY_COHORT
    if cfg.clients < policy.min_cohort:
        raise _refuse(cohort_code, "clients", cfg.clients, policy.min_cohort, _FLAG["cohort"])
    if cfg.min_clients < policy.min_cohort:
        raise _refuse(cohort_code, "min-clients", cfg.min_clients, policy.min_cohort, _FLAG["cohort"])
    if cfg.secagg_k != AUTO and cfg.secagg_k < policy.min_secagg_k:
        raise _refuse(Code.POLICY_SECAGG_K, "secagg-k", cfg.secagg_k, policy.min_secagg_k, _FLAG["k"])
    if cfg.secagg_threshold != AUTO and cfg.secagg_threshold < policy.min_secagg_threshold:
        raise _refuse(
            Code.POLICY_SECAGG_THRESHOLD,
            "secagg-threshold",
            cfg.secagg_threshold,
            policy.min_secagg_threshold,
            _FLAG["threshold"],
        )
    actual = _round_parameters(secagg)
    if actual is None:
        raise Refusal(
            Code.MESSAGE_SECAGG,
            "the run asks for secure aggregation but the message carries no secure-aggregation parameters",
        )
    cohort, k, threshold = actual
    if cohort < policy.min_cohort:
        raise _refuse(cohort_code, "cohort", cohort, policy.min_cohort, _FLAG["cohort"])
    if k < policy.min_secagg_k:
        raise _refuse(Code.POLICY_SECAGG_K, "secagg-k", k, policy.min_secagg_k, _FLAG["k"])
    if threshold < policy.min_secagg_threshold:
        raise _refuse(
            Code.POLICY_SECAGG_THRESHOLD,
            "secagg-threshold",
            threshold,
            policy.min_secagg_threshold,
            _FLAG["threshold"],
        )
    neighbours = min(k, cohort - 1)
    bound = 2 * threshold - neighbours - 1
    if threshold <= policy.max_colluders + 1:
        raise Refusal(
            Code.POLICY_COLLUDERS,
            f"this round's SecAgg+ threshold = {threshold} (k = {neighbours}) is not above this "
            f"site's policy ({_FLAG['colluders']} = {policy.max_colluders}) + 1: that many "
            "colluding neighbours know their pairwise masks with this site and, with its own "
            "share, hold enough shares of its self-mask; the server must raise secagg-k and "
            f"secagg-threshold, or the site operator must lower its {_FLAG['colluders']} flag",
            setting="secagg-threshold",
            asked=threshold,
            limit=policy.max_colluders,
        )
    if bound <= policy.max_colluders:
        raise Refusal(
            Code.POLICY_COLLUDERS,
            f"this round's SecAgg+ k = {neighbours} and threshold = {threshold} give 2t-k-1 = "
            f"{bound}, not above this site's policy ({_FLAG['colluders']} = "
            f"{policy.max_colluders}): the server and {max(bound, 0)} colluding sites of one "
            f"neighbourhood could unmask a site; the server must raise secagg-threshold, or the "
            f"site operator must lower its {_FLAG['colluders']} flag",
            setting="secagg-threshold",
            asked=threshold,
            limit=policy.max_colluders,
        )


def check_run(policy: SitePolicy, cfg: FedConfig) -> None:
    """Refuse a run whose model, labels or sizes this site does not accept.

    Checked before any model is built or any file read, for ``train`` and
    ``evaluate`` alike.
    """
    if cfg.model not in policy.allowed_models:
        raise Refusal(
            Code.POLICY_MODEL,
            f"the run's model {cfg.model!r} is not one this site runs "
            f"({_FLAG['model']}: {list(policy.allowed_models)}); the site operator can "
            f"add it with --allow-model",
            setting="model",
        )
    if set(cfg.labels) != set(policy.labels) or len(cfg.labels) != len(policy.labels):
        raise Refusal(
            Code.POLICY_LABELS,
            f"the run's labels {list(cfg.labels)} are not the label set this site "
            f"declared ({_FLAG['labels']}: {list(policy.labels)})",
            setting="labels",
        )
    for name, limit in SIZE_LIMITS.items():
        value = getattr(cfg, name)
        if value != AUTO and value > limit:
            key = name.replace("_", "-")
            raise Refusal(
                Code.POLICY_SIZE,
                f"the run's {key} = {value} is above what this site runs ({limit})",
                setting=key,
                asked=value,
                limit=limit,
            )


HOLDS_PER_TIMEOUT = 2
"""A run's ``timeout`` must be at least this many of the site's reply holds (:func:`check_hold`)."""


def check_hold(hold: float, cfg: FedConfig) -> None:
    """Refuse a run whose ``timeout`` is below :data:`HOLDS_PER_TIMEOUT` reply holds, before
    anything is spent.

    A held reply leaves ``hold`` seconds after its handling began, or a whole number of
    holds when the work outlasts one (:func:`fedseal.client.reply.answered`), and the
    server stops waiting for a stage ``timeout`` seconds after the push or its last
    answer. The hold starts only once the SuperNode has fetched the message (it polls
    every few seconds) and the reply still has to be uploaded and pulled; so the
    timeout must leave room for one hold that overruns into a second, and with less
    the site would likely spend budget on replies the server never reads. The refusal
    itself is not held (an :class:`~fedseal.common.refusals.UnheldRefusal`): it is raised before
    anything is read, and held it would likely arrive too late to be read.
    """
    least = HOLDS_PER_TIMEOUT * hold
    if hold > 0 and cfg.timeout < least:
        raise UnheldRefusal(
            Code.POLICY_TIMEOUT,
            f"the run's timeout = {cfg.timeout:g} s is below {HOLDS_PER_TIMEOUT} of this site's "
            f"reply holds (reply-hold = {hold:g} s): its replies would likely arrive after the "
            f"server stopped waiting; the server must raise timeout to at least {least:g} s, or "
            "the site operator lower its --reply-hold",
            setting="timeout",
            asked=cfg.timeout,
            limit=least,
        )


def check_evaluate(policy: SitePolicy, cfg: FedConfig) -> None:
    """Refuse federated evaluation unless the site turned it on and the run planned it.

    An answer is a step of the site's DP mechanism, budgeted only when the run's
    config asks for federated evaluation (``federated-eval = true``); a run that
    did not ask cannot spend the site's budget on it.
    """
    check_run(policy, cfg)
    if not cfg.federated_eval:
        raise Refusal(
            Code.POLICY_FEDERATED_EVAL,
            "the run's config did not plan federated "
            "evaluation, so no step of this job's budget is set aside for it",
            setting="federated-eval",
            asked=False,
        )
    if policy.federated_eval != "on":
        raise Refusal(
            Code.POLICY_FEDERATED_EVAL,
            "federated evaluation is off at this site (federated-eval = off): it would score "
            "the server's weights on the site's private data; the site operator can turn it on "
            "with --federated-eval on",
            setting="federated-eval",
            limit=False,
        )


__all__ = ["SIZE_LIMITS", "check_evaluate", "check_run", "check_train"]
