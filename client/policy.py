"""The site's policy, enforced: what a run must promise before this site trains or evaluates.

The server's config arrives with every message and is written by an
adversary as far as the site is concerned. :func:`check_train` compares it
with the site's own :class:`~fedseal.client.site.SitePolicy` (from its node config,
set by ``fedseal client`` flags) *before* any model is built or any record
is read, and raises :class:`PolicyRefusal` naming the setting the server
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
    no larger than ``max-update-clip``.
"""

from __future__ import annotations

from typing import Mapping

from fedseal.client.reply import Refusal
from fedseal.client.site import SitePolicy
from fedseal.common.config import AUTO, FedConfig
from fedseal.common.secagg_wire import WireError, unpack_ids

# The node-config flag that lowers each minimum, named in every refusal.
_FLAG = {"dp": "require-dp", "secagg": "require-secagg", "cohort": "min-cohort",
         "k": "min-secagg-k", "threshold": "min-secagg-threshold", "clip": "max-update-clip",
         "colluders": "max-colluders", "eval": "federated-eval"}


class PolicyRefusal(Refusal):
    """The run asks for less than the site's policy allows; the message names the setting."""


def _refuse(setting: str, asked: object, policy_value: object, flag: str) -> PolicyRefusal:
    return PolicyRefusal(
        f"the run's {setting} = {asked} is below this site's policy ({flag} = {policy_value}); "
        f"the server must change {setting}, or the site operator must change its {flag} flag")


def _round_parameters(secagg: Mapping[str, object] | None) -> tuple[int, int, int] | None:
    """``(cohort, k, threshold)`` of the round's SecAgg+ parameters, if the message has them."""
    if secagg is None:
        return None
    try:
        cohort = len(unpack_ids(secagg["nodes"]))  # type: ignore[arg-type]
        return cohort, int(secagg["k"]), int(secagg["threshold"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError, WireError):
        raise PolicyRefusal("the server's secure-aggregation parameters (nodes, k, threshold) "
                            "are missing or malformed") from None


def check_train(policy: SitePolicy, cfg: FedConfig,
                secagg: Mapping[str, object] | None) -> None:
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
    PolicyRefusal
        Naming the first setting that falls short.
    """
    if policy.require_dp and not cfg.dp:
        raise _refuse("dp", "false", "true", _FLAG["dp"])
    if policy.require_secagg and not cfg.secagg:
        raise _refuse("secagg", "false", "true", _FLAG["secagg"])
    if cfg.update_clip > policy.max_update_clip:
        raise PolicyRefusal(
            f"the run's update-clip = {cfg.update_clip} is above this site's policy "
            f"({_FLAG['clip']} = {policy.max_update_clip}); the server must lower update-clip")
    if not cfg.secagg:
        return  # a plain round: the site agreed to show its (DP) update; no sum to protect
    if cfg.clients < policy.min_cohort:
        raise _refuse("clients", cfg.clients, policy.min_cohort, _FLAG["cohort"])
    if cfg.min_clients < policy.min_cohort:
        raise _refuse("min-clients", cfg.min_clients, policy.min_cohort, _FLAG["cohort"])
    if cfg.secagg_k != AUTO and cfg.secagg_k < policy.min_secagg_k:
        raise _refuse("secagg-k", cfg.secagg_k, policy.min_secagg_k, _FLAG["k"])
    if cfg.secagg_threshold != AUTO and cfg.secagg_threshold < policy.min_secagg_threshold:
        raise _refuse("secagg-threshold", cfg.secagg_threshold, policy.min_secagg_threshold,
                      _FLAG["threshold"])
    actual = _round_parameters(secagg)
    if actual is None:
        raise PolicyRefusal("the run asks for secure aggregation but the message carries no "
                            "secure-aggregation parameters")
    cohort, k, threshold = actual
    if cohort < policy.min_cohort:
        raise _refuse("cohort of this round", cohort, policy.min_cohort, _FLAG["cohort"])
    if k < policy.min_secagg_k:
        raise _refuse("SecAgg+ k of this round", k, policy.min_secagg_k, _FLAG["k"])
    if threshold < policy.min_secagg_threshold:
        raise _refuse("SecAgg+ threshold of this round", threshold, policy.min_secagg_threshold,
                      _FLAG["threshold"])
    neighbours = min(k, cohort - 1)
    bound = 2 * threshold - neighbours - 1
    if threshold <= policy.max_colluders + 1:
        raise PolicyRefusal(
            f"this round's SecAgg+ threshold = {threshold} (k = {neighbours}) is not above this "
            f"site's policy ({_FLAG['colluders']} = {policy.max_colluders}) + 1: that many "
            "colluding neighbours know their pairwise masks with this site and, with its own "
            "share, hold enough shares of its self-mask; the server must raise secagg-k and "
            f"secagg-threshold, or the site operator must lower its {_FLAG['colluders']} flag")
    if bound <= policy.max_colluders:
        raise PolicyRefusal(
            f"this round's SecAgg+ k = {neighbours} and threshold = {threshold} give 2t-k-1 = "
            f"{bound}, not above this site's policy ({_FLAG['colluders']} = "
            f"{policy.max_colluders}): the server and {max(bound, 0)} colluding sites of one "
            f"neighbourhood could unmask a site; the server must raise secagg-threshold, or the "
            f"site operator must lower its {_FLAG['colluders']} flag")


def check_evaluate(policy: SitePolicy) -> None:
    """Refuse federated evaluation unless the site turned it on."""
    if policy.federated_eval != "on":
        raise PolicyRefusal(
            "federated evaluation is off at this site (federated-eval = off): it would score "
            "the server's weights on the site's private data; the site operator can turn it on "
            "with --federated-eval on")


__all__ = ["PolicyRefusal", "check_evaluate", "check_train"]
