"""The scale-free vote: how a site's training-round update enters the mean.

Under label skew a site's head, trained for a whole round on its own label mix,
drifts towards it, and a site with few examples adds DP noise far larger than
its signal. A plain mean of the sites' updates lets whichever drifted or
noisiest site is largest decide the round: on SST-2 split by Dirichlet(0.5)
over ten sites, the mean read 0.593 without noise and 0.696 at epsilon 8
(docs/benchmarks.md). A per-coordinate clip of 1 had fixed that by turning each
update into about a sign, but a fixed bound is one scale for every task: a
head that must move by tens per coordinate (the synthetic default) cannot.

So each site sends its update in units of its own typical move, and the scale
travels beside it:

* the site's scale ``tau`` is :data:`VOTE_UNIT` (3) times the median absolute
  value of its update's non-zero entries (the entries the round trained);
* its votes are ``clip(update / tau, -1, 1)``: an entry up to three typical
  moves keeps its size, a larger one counts as one full vote, so no site decides
  a coordinate alone however far it drifted or however loud its noise;
* it also sends ``log(tau) / LOG_SPAN`` (clipped to [-1, 1]: ``tau`` from
  ``e^-LOG_SPAN`` to ``e^LOG_SPAN``), as one more entry of the (masked) update,
  so the server learns only the sum over sites;
* the server's step is the weighted mean vote times ``exp`` of the weighted
  mean ``log(tau)`` (the sites' geometric mean scale, which one loud site moves
  only by its share), at most ``update-clip`` per coordinate.

Every entry a site sends in a vote round lies in [-1, 1], so the round's bound
(:func:`round_clip`) is 1 instead of ``update-clip``: an honest site's encoder
clips to it (on a grid 64 times finer at the default clip), and the server
clips each *plain* update to it times the site's weight. What this bounds is
honest drift and noise. A malicious site is bounded differently:

* in plain rounds, by the server's clip: it moves each coordinate of the mean
  vote by at most ``2 w / sum(w)`` and the mean ``log(tau)`` by its share of
  ``2 * LOG_SPAN`` (so with 3 sites it can multiply the step by up to
  ``e^(2 * LOG_SPAN / 3)``, until the step reaches ``update-clip``);
* under secure aggregation the server sees only the sum, which it checks only
  against the range honest sites can produce, so a site that departs from the
  protocol can still outweigh the others, as it could under the plain mean.
  Only the last bound holds for it: the step moves each coordinate by at most
  ``update-clip``.

Everything a site computes here is post-processing of its differentially
private update: it costs no privacy. ``aggregation = mean`` sends the plain
update instead (the earlier behaviour).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedseal.common.config import AUTO, FedConfig
from fedseal.common.dp_rule import FEATURE_MEAN_KEY, HEAD_WEIGHT_KEY, PRIOR_KEY, adapter_rounds, stats_rounds

SCALE_KEY = "fedseal.vote.log_scale"
"""The update entry that carries ``log(tau) / LOG_SPAN``; no model parameter has this name."""
LOG_SPAN = math.log(1e6)
"""``log(tau)`` is sent over this span: a site's typical move between 1e-6 and 1e6."""
VOTE_UNIT = 3.0
"""``tau`` in median moves. With 1, a head whose few informative coordinates move far
more than the median (the synthetic default) had them cut to the median: ``make
run`` read 0.838, 0.878, 0.845 and 0.868; with 3, 0.870, 0.880, 0.885. On cached
SST-2 features (Dirichlet 0.5, epsilon 8, two seeds) 3 read 0.829 and 0.811, 1
read 0.814 and 0.796 (docs/benchmarks.md)."""
VOTE_CLIP = 1.0
"""The bound of every entry in a vote round (votes, the scale entry, the weight), and in the
statistics round."""


def is_vote_round(cfg: FedConfig, server_round: int) -> bool:
    """Whether round ``server_round`` of run ``cfg`` sends votes instead of updates.

    ``aggregation = auto`` votes in the probe's training rounds (where it was
    measured), also LP-FT's (``lora``), and sends plain updates in LP-FT's
    adapter rounds and in full fine-tuning.
    """
    if server_round <= stats_rounds(cfg):
        return False  # the statistics round's means are averaged as they are
    if cfg.aggregation == AUTO:
        return cfg.finetune == "probe" or (cfg.finetune == "lora" and not is_adapter_round(cfg, server_round))
    return cfg.aggregation == "vote"


def is_adapter_round(cfg: FedConfig, server_round: int) -> bool:
    """Whether ``server_round`` is one of LP-FT's adapter rounds (``finetune = lora``)."""
    return cfg.finetune == "lora" and server_round > cfg.rounds - adapter_rounds(cfg.rounds, cfg.dp_noise)


def round_phase(cfg: FedConfig, server_round: int) -> str:
    """What round ``server_round`` of run ``cfg`` trains: ``"statistics"``, ``"head"``,
    ``"adapters"`` or ``"all weights"``.

    The statistics round, then the head (the probe, and LP-FT's first rounds), then
    LP-FT's adapter rounds (:func:`is_adapter_round`); full fine-tuning trains all its
    weights in every round. The server writes it into each round's metrics row, and a
    resumed run checks its completed rounds against it (:mod:`fedseal.server.checkpoint`).
    """
    if cfg.finetune == "full":
        return "all weights"
    if server_round <= stats_rounds(cfg):
        return "statistics"
    return "adapters" if is_adapter_round(cfg, server_round) else "head"


def round_clip(cfg: FedConfig, server_round: int) -> float:
    """The bound every entry of a site's weighted update is clipped to in this round.

    1 in a vote round (votes and the scale entry lie in [-1, 1]) and in the
    statistics round (a mean of unit-norm feature vectors and label
    proportions lie in [-1, 1]); ``update-clip`` otherwise.
    """
    if server_round <= stats_rounds(cfg) or is_vote_round(cfg, server_round):
        return VOTE_CLIP
    return cfg.update_clip


def round_keys(weights: Mapping[str, np.ndarray], cfg: FedConfig, server_round: int) -> list[str]:
    """The weights round ``server_round`` moves: what a site sends, and all the server steps.

    The probe's statistics round sets the feature mean and the head's bias (the
    label prior); its training rounds train the head's weights alone, so the
    bias and the feature mean stay as the statistics round set them whatever a
    site sends. LP-FT (``lora``) does the same in its probe rounds, then its
    adapter rounds move the LoRA adapters and the head's weights. Full
    fine-tuning trains every trainable weight.
    """
    if cfg.finetune == "full":
        return list(weights)
    if server_round <= stats_rounds(cfg):
        return [k for k in weights if k in (FEATURE_MEAN_KEY, PRIOR_KEY)]
    if is_adapter_round(cfg, server_round):
        return [k for k in weights if k == HEAD_WEIGHT_KEY or ".lora_" in k]
    return [k for k in weights if k == HEAD_WEIGHT_KEY]


def update_template(
    weights: Mapping[str, np.ndarray], cfg: FedConfig, server_round: int
) -> OrderedDict[str, np.ndarray]:
    """The names and shapes a site's update has in round ``server_round``: the weights the
    round moves (:func:`round_keys`), and the vote's scale entry in a vote round."""
    template = OrderedDict((k, weights[k]) for k in round_keys(weights, cfg, server_round))
    if is_vote_round(cfg, server_round):
        template[SCALE_KEY] = np.zeros(1, dtype=np.float32)
    return template


def site_scale(update: Mapping[str, np.ndarray]) -> float:
    """``tau``: :data:`VOTE_UNIT` times the median absolute non-zero entry of ``update``.

    An update with no non-zero entry (no step moved anything) gets 1: its votes
    are all 0, but its ``log(tau)`` of 0 still counts in the mean scale.
    """
    moved = np.concatenate([np.abs(np.asarray(v, dtype=np.float64)).ravel() for v in update.values()])
    moved = moved[moved > 0]
    return VOTE_UNIT * float(np.median(moved)) if moved.size else 1.0


def to_votes(update: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """A site's update as votes in ``[-1, 1]`` plus its scale entry under :data:`SCALE_KEY`."""
    tau = site_scale(update)
    votes = OrderedDict(
        (k, np.clip(np.asarray(v, dtype=np.float64) / tau, -1.0, 1.0).astype(np.float32))
        for k, v in update.items()
    )
    votes[SCALE_KEY] = np.array([min(max(math.log(tau) / LOG_SPAN, -1.0), 1.0)], dtype=np.float32)
    return votes


def from_votes(mean: Mapping[str, np.ndarray], clip: float) -> tuple[OrderedDict[str, np.ndarray], float]:
    """The server's step from the mean votes, and the scale it used.

    The scale is ``exp`` of the mean ``log(tau)``, at most ``clip`` (``update-clip``); the mean
    votes are clipped to ``[-1, 1]`` (honest sites' are), so every coordinate of
    the step lies within ``clip``.
    """
    log_scale = LOG_SPAN * float(np.asarray(mean[SCALE_KEY], dtype=np.float64).reshape(-1)[0])
    if not math.isfinite(log_scale):
        scale = 0.0
    else:
        scale = clip if log_scale >= math.log(clip) else math.exp(log_scale)
    step = OrderedDict(
        (k, np.clip(np.asarray(v, dtype=np.float64), -1.0, 1.0) * scale)
        for k, v in mean.items()
        if k != SCALE_KEY
    )
    return step, scale


__all__ = [
    "LOG_SPAN",
    "SCALE_KEY",
    "VOTE_CLIP",
    "VOTE_UNIT",
    "from_votes",
    "is_adapter_round",
    "is_vote_round",
    "round_clip",
    "round_phase",
    "round_keys",
    "site_scale",
    "to_votes",
    "update_template",
]
