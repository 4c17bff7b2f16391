"""How large a site's noise share must be for its policy, and the site's refusal.

A record is protected only by noise the server cannot subtract. The server knows
the shares of the sites that collude with it, and a sum can hold fewer shares
than the round started with: sites that drop out *before* sending their masked
share are simply missing (SecAgg+ then sums the survivors), while a share that
was sent stays in the sum even if its site drops later. A site sends its share
before it knows how many others will, so it assumes the worst its policy admits:

* the sum holds at least ``min_cohort`` shares (a site never helps unmask a sum
  of fewer: :mod:`fedseal.client.secagg` passes ``min_survivors = min_cohort``);
* at most ``max_colluders`` of them belong to sites colluding with the server.

So at least ``h = min_cohort - max_colluders`` honest shares (its own among them)
are in every sum it takes part in. Honest sites draw independent shares of scale
``s``, so the noise the server cannot remove has variance at least ``h s^2``;
reaching a total scale ``z * D2`` (noise multiplier ``z``, record sensitivity
``D2``) needs::

    share variance  s^2 >= (z D2)^2 / h,   i.e.  s ~ z D2 / sqrt(h)

(:func:`required_share_sigma` adds the accountant's ``r^2 = 9`` to ``(z D2)^2``,
nothing in ring units where ``z D2`` is at least ``10^4``, and rounds up).

Every honest site adds the round's one share scale (a public round parameter),
so each site checks that scale against its own policy and refuses a round whose
shares are too small for it (:func:`check_share`). More honest shares than ``h``
only add independent noise, which post-processing cannot undo: the guarantee
still holds. The price is paid in accuracy: all ``n`` sites add shares, so the
sum carries ``n / h`` times the target variance.
"""

from __future__ import annotations

from .accounting import DdgMechanism
from .encoding import Encoding, required_share_sigma
from .errors import ShareRefusal


def honest_shares(min_cohort: int, max_colluders: int) -> int:
    """Fewest honest shares in any sum a site with this policy takes part in.

    Raises
    ------
    ShareRefusal
        If the policy leaves no honest share (``min_cohort <= max_colluders``).
    """
    h = min_cohort - max_colluders
    if max_colluders < 0 or h < 1:
        raise ShareRefusal(
            f"min-cohort = {min_cohort} and max-colluders = {max_colluders} leave "
            "no honest share in a sum: raise min-cohort or lower max-colluders"
        )
    return h


def check_share(
    encoding: Encoding, *, noise_multiplier: float, min_cohort: int, max_colluders: int, cohort: int
) -> DdgMechanism:
    """Refuse a round whose shares are too small for this site; else the mechanism to record.

    Parameters
    ----------
    encoding : Encoding
        The round's public parameters, as the server sent them (already validated
        by :class:`Encoding`).
    noise_multiplier : float
        The site's own planned noise multiplier (from its budget and plan).
    min_cohort, max_colluders : int
        The site's policy.
    cohort : int
        Sites in this round (the SecAgg+ node list).

    Returns
    -------
    DdgMechanism
        The mechanism a step of this round is, for the site's ledger.

    Raises
    ------
    ShareRefusal
        If the cohort is below ``min_cohort``, exceeds the encoding's ``max_sites``, or
        the round's share scale is below what ``noise_multiplier`` needs with the
        policy's honest shares.
    """
    h = honest_shares(min_cohort, max_colluders)
    if cohort < min_cohort:
        raise ShareRefusal(f"this round has {cohort} sites, below this site's min-cohort = {min_cohort}")
    if cohort > encoding.max_sites:
        raise ShareRefusal(
            f"this round has {cohort} sites but its encoding holds at most "
            f"{encoding.max_sites} shares without wrapping"
        )
    need = required_share_sigma(noise_multiplier, encoding.l2_sensitivity, h)
    if encoding.share_sigma < need:
        raise ShareRefusal(
            f"this round's noise share scale {encoding.share_sigma} is below the {need} that "
            f"noise multiplier {noise_multiplier:.4g} needs when only {h} of the shares are "
            f"honest (min-cohort {min_cohort} less max-colluders {max_colluders}); the server "
            "must raise the share scale"
        )
    return DdgMechanism(
        share_sigma=float(encoding.share_sigma),
        honest_shares=h,
        l2_sensitivity=encoding.l2_sensitivity,
        dim=encoding.padded_dim,
    )


__all__ = ["check_share", "honest_shares", "required_share_sigma"]
